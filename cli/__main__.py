"""``python -m sgn_lab.cli``: the ``sgn-lab`` command (e.g. ``torchrun ... -m sgn_lab.cli``)."""

from sgn_lab.cli.app import main

main()
