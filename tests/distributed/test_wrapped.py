"""Wrapped models: DDP is measured through its module, FSDP2 on its gathered parameters; FSDP1
and tensor parallelism are refused with a message, by the probe and by the per-sample
functions.

A one-process gloo group (a file rendezvous in the test's folder) is enough to build each
wrapper on the CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from sgn_lab import NoiseProbe, per_sample_grads, per_sample_gram
from sgn_lab.distributed import unwrapped


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP on a CPU warns about its device
        return FullyShardedDataParallel(model, device_id=torch.device("cpu"))


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DeviceMesh

    fully_shard(model, mesh=DeviceMesh("cpu", [0]))
    return model


def tensor_parallel(model):
    from torch.distributed.tensor import DeviceMesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    return parallelize_module(model, DeviceMesh("cpu", [0]), {"0": ColwiseParallel()})


def test_ddp_is_measured_through_its_module(group):
    from torch.nn.parallel import DistributedDataParallel

    model = mlp()
    wrapped = DistributedDataParallel(model)
    assert unwrapped(wrapped) is model
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    want = per_sample_grads(model, F.mse_loss, x, y)
    got = per_sample_grads(wrapped, F.mse_loss, x, y)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(per_sample_gram(wrapped, F.mse_loss, x, y),
                       per_sample_gram(model, F.mse_loss, x, y))
    assert NoiseProbe(wrapped, F.mse_loss, x, y, samples=5).model is model


def test_fsdp2_is_measured_on_its_gathered_parameters(group):
    """fully_shard per layer and at the root: the per-sample functions and the probe gather
    the parameters for the call, give the unsharded model's numbers, and leave the model
    sharded (a group of one; 2 and 3 ranks: test_gns.py, test_fsdp.py)."""
    from torch.distributed.tensor import DTensor

    from sgn_lab.distributed.fsdp import shard_blocks

    reference, model = mlp(), mlp()
    assert shard_blocks(model) == ["0", "2"]
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    want = per_sample_grads(reference, F.mse_loss, x, y)
    got = per_sample_grads(model, F.mse_loss, x, y)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    torch.testing.assert_close(per_sample_gram(model, F.mse_loss, x, y),
                               per_sample_gram(reference, F.mse_loss, x, y), rtol=1e-12, atol=0)
    row = NoiseProbe(model, F.mse_loss, x, y, samples=5, instruments=["sgn", "eval"]).measure(0)
    want_row = NoiseProbe(reference, F.mse_loss, x, y, samples=5,
                          instruments=["sgn", "eval"]).measure(0).row
    for key in ("trace", "mean_sq_norm", "train_loss", "effective_rank"):
        assert row.row[key] == pytest.approx(want_row[key], rel=1e-12), key
    assert all(isinstance(p, DTensor) for p in model.parameters())
    with pytest.raises(ValueError, match="the updates instrument steps copies"):
        NoiseProbe(model, F.mse_loss, x, y, samples=5, instruments=["updates"],
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1), batch_size=2,
                   update_repeats=2)


def test_blocks_are_named_by_class_or_found(group):
    from sgn_lab.distributed.fsdp import block_names

    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()),
                          nn.Linear(4, 2))
    assert block_names(model) == ["0", "1", "2"]
    assert block_names(model, ["Linear"]) == ["0", "1.0", "2"]
    assert block_names(model, ["Sequential"]) == ["1"]  # the root is sharded last, by itself
    with pytest.raises(ValueError, match="no module of class Block in the model; its classes: "
                                         "Linear, Sequential, Tanh"):
        block_names(model, ["Block"])


@pytest.mark.parametrize(("wrap", "says"), [
    (fsdp1, "FullyShardedDataParallel (FSDP1) is not supported"),
    (tensor_parallel, "parameters that stay DTensors once FSDP has gathered them (tensor "
                      "parallelism), e.g. '0.weight', are not supported"),
])
def test_sharded_models_are_refused_everywhere(group, wrap, says):
    model = wrap(mlp())
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    for call in (lambda: unwrapped(model),
                 lambda: per_sample_grads(model, F.mse_loss, x, y),
                 lambda: per_sample_gram(model, F.mse_loss, x, y),
                 lambda: NoiseProbe(model, F.mse_loss, x, y, samples=5)):
        with pytest.raises(ValueError, match="is not supported|are not supported") as refused:
            call()
        assert says in str(refused.value)
