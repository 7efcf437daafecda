"""`sgn-lab --help` and each command's --help load no heavy library: counted in modules, in a
fresh interpreter, not in seconds."""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "scipy", "pandas", "matplotlib", "transformers")

_SCRIPT = """
import contextlib, io, json, sys
from sgn_lab.cli.app import main
sys.argv = ["sgn-lab", *json.loads(sys.argv[1])]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main()
    except SystemExit:
        pass
print(json.dumps({"modules": sorted(sys.modules), "help": out.getvalue()}))
"""


def _help(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(args)], check=True,
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("command", [(), ("measure",), ("compare",), ("plot",), ("scaling",),
                                     ("figures",)])
def test_help_imports_nothing_heavy(command):
    modules = _help(*command, "--help")["modules"]
    loaded = [m for m in modules if m.split(".")[0] in HEAVY]
    assert not loaded, f"sgn-lab {' '.join(command)} --help imported {loaded[:5]}"


def test_measure_help_still_lists_the_tasks_models_and_methods():
    from sgn_lab.data.catalog import FILE_TASKS, TASKS
    from sgn_lab.models.names import MODELS, TRANSFORMERS
    from sgn_lab.optim.registry import METHODS

    text = " ".join(_help("measure", "--help")["help"].split())
    for name in (*TASKS, *FILE_TASKS, *MODELS, *TRANSFORMERS, *METHODS):
        assert name in text, name
