"""The installed package must contain every subpackage, not only what an editable install sees."""

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_installation():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # An editable install finds unlisted subpackages through the source folder; a wheel does
    # not, so `pip install .` would ship without them.
    on_disk = {
        ".".join(("sgn_lab", *init.parent.relative_to(ROOT / "sgn_lab").parts))
        for init in (ROOT / "sgn_lab").rglob("__init__.py")
    } | {"sgn_lab.cli"}
    assert on_disk == set(setuptools["packages"])
    for package in setuptools["packages"]:
        assert (ROOT / setuptools["package-dir"][package] / "__init__.py").is_file(), package
