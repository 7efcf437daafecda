"""Lazy package exports (sgn_lab.lazy): each name from its module, once, as a real import gives."""

import importlib
import importlib.util

import pytest

PACKAGES = ("sgn_lab.data", "sgn_lab.models", "sgn_lab.optim", "sgn_lab.run", "sgn_lab.sweeps")


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_resolves_to_its_modules_object(name):
    package = importlib.import_module(name)
    for export in package.__all__:
        value = getattr(package, export)
        assert getattr(importlib.import_module(package._HOME[export]), export) is value
        assert export in dir(package)


@pytest.mark.parametrize("name", PACKAGES)
def test_no_exported_name_is_also_a_module_of_the_package(name):
    # Importing such a module would bind the package's name to the module, not the export.
    package = importlib.import_module(name)
    for export in package.__all__:
        assert importlib.util.find_spec(f"{name}.{export}") is None, export


def test_an_unknown_name_is_an_attribute_error():
    import sgn_lab.optim

    with pytest.raises(AttributeError, match="'sgn_lab.optim' has no attribute 'nope'"):
        sgn_lab.optim.nope  # noqa: B018


def test_fsdp_names_are_loaded_on_first_use_only():
    """The command line's start-up does not pay for torch's DTensor machinery (0.7 s)."""
    import subprocess
    import sys

    code = ("import sys, sgn_lab.distributed, sgn_lab.run.loop; "
            "assert 'torch.distributed.tensor' not in sys.modules, 'loaded at import'; "
            "from sgn_lab.distributed import ShardedNoiseScale, shard_blocks; "
            "from sgn_lab.distributed.fsdp import ShardedNoiseScale as home; "
            "assert ShardedNoiseScale is home and 'shard_blocks' in dir(sgn_lab.distributed)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
