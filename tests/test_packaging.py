"""The wheel holds every subpackage (not only what an editable install sees), the CLI as
sgn_lab.cli and never as a top-level `cli`, and the figures' config files."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_package_and_the_cli_under_sgn_lab(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("sgn_lab", "cli"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("sgn_lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "sgn_lab").rglob("__init__.py")}
    assert on_disk and on_disk <= names, sorted(on_disk - names)
    cli = {f"sgn_lab/cli/{path.name}" for path in (ROOT / "cli").glob("*.py")}
    assert {"sgn_lab/cli/app.py", "sgn_lab/cli/__main__.py"} <= cli <= names
    assert not any(name.startswith("cli/") for name in names)
    configs = {p.relative_to(ROOT).as_posix()
               for p in (ROOT / "sgn_lab/figures/configs").glob("*.toml")}
    assert configs and configs <= names
