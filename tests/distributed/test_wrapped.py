"""Wrapped models: DDP is measured through its module; FSDP (both APIs) and tensor parallelism
are refused with a message, by the probe and by the per-sample functions.

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


@pytest.mark.parametrize(("wrap", "says"), [
    (fsdp1, "FSDP-sharded models are not supported yet"),
    (fsdp2, "FSDP-sharded models are not supported yet"),
    (tensor_parallel, "parameters sharded as DTensors (tensor parallelism or FSDP2), e.g. "
                      "'0.weight', are not supported yet"),
])
def test_sharded_models_are_refused_everywhere(group, wrap, says):
    model = wrap(mlp())
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    for call in (lambda: unwrapped(model),
                 lambda: per_sample_grads(model, F.mse_loss, x, y),
                 lambda: per_sample_gram(model, F.mse_loss, x, y),
                 lambda: NoiseProbe(model, F.mse_loss, x, y, samples=5)):
        with pytest.raises(ValueError, match="not supported yet") as refused:
            call()
        assert says in str(refused.value)
