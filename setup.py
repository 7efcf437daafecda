"""Which packages the wheel holds: every package under sgn_lab/, found on disk, and the
top-level folder cli/ installed as sgn_lab.cli (so it never claims the global module name
``cli``). Everything else about the project is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["sgn_lab", "sgn_lab.*"]), "sgn_lab.cli"],
    package_dir={"sgn_lab.cli": "cli"},
)
