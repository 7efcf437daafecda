"""The `sgn-lab` command line (installed as the module ``sgn_lab.cli``)."""
