"""The version of sgn-lab, which every run directory and table records (``sgn_lab_version``).

A module of its own, with no imports, so that recording it never imports the package."""

__version__ = "0.1.0"
