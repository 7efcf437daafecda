"""The probe set split over processes: the Gram, mean and diag(S) from rank blocks, and whole
NoiseProbe measurements, against one process on the same samples.

One launch of 3 processes (sgn_lab.distributed.launch, gloo on localhost) serves the module;
ranks 0 and 1 repeat everything as a 2-rank group. The models are float64, so the rank
blocks must equal the one-process Gram to 1e-10 relative; the probe set sizes do not split
evenly (7 over 2 and 3 ranks). References are computed here, in this process.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from helpers import loop_grads, relative_error, seeded
from torch import nn
from torch.nn import functional as F

from sgn_lab import NoiseProbe, per_sample_gram
from sgn_lab.checks import NonFiniteError
from sgn_lab.distributed import Ranks, launch, split_gram
from sgn_lab.distributed import gram_over_ranks as gram_module

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD = 3
N = 7  # probe samples: 4+3 and 3+2+2 over the ranks
D = torch.float64


class Tokens(nn.Module):
    """Embedding (rows picked by an index), a shared weight used twice, a tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)  # packed q, k, v rows

    def forward(self, ids):
        h = self.embed(ids)
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return h @ self.embed.weight.T  # (n, T, vocab)


class Cumulative(nn.Module):
    """A parameter inside an operation no rule covers (cumsum): the vmap route."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.cumsum(x * self.scale, dim=-1))


def token_loss(logits, ids):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


def problems() -> dict[str, tuple[Any, ...]]:
    """name -> (model, x, y, loss), float64, seeded."""
    g = torch.Generator().manual_seed(0)
    with seeded(0):
        mlp = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)
        conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)).to(D)
        tokens, cumulative = Tokens().to(D), Cumulative().to(D)
    ids = torch.randint(0, 11, (N, 4), generator=g)
    labels = torch.randint(0, 3, (N,), generator=g)
    return {
        "mlp": (mlp, torch.randn(N, 5, generator=g, dtype=D), labels, F.cross_entropy),
        "conv": (conv, torch.randn(N, 2, 5, 5, generator=g, dtype=D), labels, F.cross_entropy),
        "tokens": (tokens, ids, ids, token_loss),
        "cumulative": (cumulative, torch.randn(N, 5, generator=g, dtype=D), labels,
                       F.cross_entropy),
    }


PROBE = {"samples": N, "batch_size": 4, "update_repeats": 3, "seed": 5,
         "instruments": ["eval", "sgn", "tails", "curvature", "updates", "layers"]}


def probe_task():
    """A float64 MLP on 20 training and 9 test samples, and its optimizer."""
    g = torch.Generator().manual_seed(1)
    with seeded(1):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    x, y = torch.randn(29, 4, generator=g, dtype=D), torch.randint(0, 3, (29,), generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, (x[:20], y[:20], x[20:], y[20:])


def measure(ranks: Ranks, grads: str) -> tuple[dict, pd.DataFrame]:
    model, optimizer, (x, y, xt, yt) = probe_task()
    instruments = [i for i in PROBE["instruments"] if grads == "vmap" or i != "curvature"]
    probe = NoiseProbe(model, F.cross_entropy, x, y, x_test=xt, y_test=yt,
                       optimizer=optimizer, method="momentum", grads=grads, ranks=ranks,
                       **{**PROBE, "instruments": instruments})
    result = probe.measure(0)
    return result.row, result.spectra


# ---------------------------------------------------------------- the launched ranks


def non_finite() -> None:
    raise NonFiniteError("non-finite value in row 3 of the Gram matrix")


def on_ranks(ranks: Ranks) -> dict[int, dict[str, Any]]:
    pair = dist.new_group([0, 1])  # every rank takes part in creating it
    out = {WORLD: everything(ranks)}
    if ranks.rank < 2:
        out[2] = everything(Ranks.of(pair))
    ranks.barrier()
    return out


def everything(ranks: Ranks) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, (model, x, y, loss) in problems().items():
        for grads in ("gram", "vmap"):
            before = dict(ranks.traffic)
            split = split_gram(model, loss, x, y, ranks, grads=grads, verify=2)
            sent = {k: v - before.get(k, 0) for k, v in ranks.traffic.items()}
            found[name, grads] = (split, sent)
    for grads in ("gram", "vmap"):
        before = ranks.traffic["gradients"]
        found["probe", grads] = measure(ranks, grads)
        found["probe gradients", grads] = ranks.traffic["gradients"] - before
    calls: list[int] = []
    found["once"] = ranks.once(lambda: calls.append(ranks.rank) or ("made on", ranks.rank))
    found["once calls"] = calls
    try:
        ranks.once(non_finite)
    except NonFiniteError as error:  # its own type on every rank
        found["once error"] = str(error)
    held, gram_module.HELD_BYTES = gram_module.HELD_BYTES, 0  # each block as it arrives
    try:
        model, x, y, loss = problems()["tokens"]
        found["eager"] = split_gram(model, loss, x, y, ranks)
    finally:
        gram_module.HELD_BYTES = held
    try:
        model, x, y, loss = problems()["mlp"]
        split_gram(model, loss, x[: ranks.size - 1], y[: ranks.size - 1], ranks)
    except ValueError as refused:
        found["too few"] = str(refused)
    return found


@pytest.fixture(scope="module")
def runs() -> dict[int, dict[int, dict[str, Any]]]:
    """world size -> rank -> what that rank found."""
    by_rank = launch(WORLD, on_ranks)
    return {w: {r: by_rank[r][w] for r in range(w)} for w in (WORLD, 2)}


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("grads", ["gram", "vmap"])
@pytest.mark.parametrize("name", ["mlp", "conv", "tokens", "cumulative"])
def test_rank_blocks_give_the_one_process_gram_and_moments(runs, world, grads, name):
    model, x, y, loss = problems()[name]
    reference = loop_grads(model, loss, x, y)
    G = torch.cat([g.reshape(N, -1) for g in reference.values()], dim=1)
    for rank, found in runs[world].items():
        split, _ = found[name, grads]
        assert relative_error(split.gram, G @ G.T) <= 1e-10, rank
        assert relative_error(split.mean, G.mean(dim=0)) <= 1e-10, rank
        if grads == "vmap":
            assert relative_error(split.diag_variance, G.var(dim=0)) <= 1e-10, rank
        else:
            assert split.diag_variance is None
    # every rank holds the same matrix, bit for bit
    grams = [found[name, grads][0].gram for found in runs[world].values()]
    assert all(torch.equal(grams[0], K) for K in grams[1:])
    assert relative_error(per_sample_gram(model, loss, x, y), G @ G.T) <= 1e-10


@pytest.mark.parametrize("world", [2, 3])
def test_blocks_computed_as_payloads_arrive_are_the_same(runs, world):
    """Above HELD_BYTES of received payloads a rank computes each block on arrival: the same
    Gram, bit for bit."""
    for found in runs[world].values():
        assert torch.equal(found["eager"].gram, found["tokens", "gram"][0].gram)


@pytest.mark.parametrize("world", [2, 3])
def test_payload_bytes_are_what_the_routes_say(runs, world):
    """vmap sends gradients: rank r receives 8·n_s·d bytes from every other rank s (float64),
    then the n×n Gram and the d-vector mean (and diag) by all-reduce."""
    model, *_ = problems()["mlp"]
    d = sum(p.numel() for p in model.parameters())
    sizes = [hi - lo for lo, hi in Ranks(0, world).bounds(N)]
    for rank, found in runs[world].items():
        split, sent = found["mlp", "vmap"]
        assert set(split.payload.values()) == {"gradients"}
        assert sent["payload"] == sum(8 * n_s * d for s, n_s in enumerate(sizes) if s != rank)
        assert sent["sum"] == 8 * N * N + 2 * 8 * d
        split, sent = found["mlp", "gram"]
        assert sent["sum"] == 8 * N * N + 8 * d


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("grads", ["gram", "vmap"])
def test_a_split_measurement_equals_one_process(runs, world, grads):
    ranks_rows = [found["probe", grads] for found in runs[world].values()]
    want_row, want_spectra = measure(Ranks(), grads)
    for row, spectra in ranks_rows:
        assert set(row) == set(want_row)
        for key, want in want_row.items():
            if key == "measure_seconds":
                continue
            got = row[key]
            if isinstance(want, float) and math.isfinite(want):
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12), key
            elif isinstance(want, float):
                assert not math.isfinite(got) and (math.isnan(got) == math.isnan(want)), key
            else:
                assert got == want, key
        pd.testing.assert_frame_equal(spectra[["step", "kind", "k"]],
                                      want_spectra[["step", "kind", "k"]])
        top = want_spectra.groupby("kind").eigenvalue.transform("max")
        assert ((spectra.eigenvalue - want_spectra.eigenvalue).abs() <= 1e-9 * top).all()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("grads", ["gram", "vmap"])
def test_per_sample_gradients_go_to_rank_0_alone(runs, world, grads):
    """tails, curvature and layers need the n × d gradients: rank 0 receives the other ranks'
    blocks (float64, d = 51), the others receive none and hold only their own."""
    d = 4 * 6 + 6 + 6 * 3 + 3
    first = Ranks(0, world).bounds(N)[0]
    for rank, found in runs[world].items():
        want = (N - (first[1] - first[0])) * d * 8 if rank == 0 else 0
        assert found["probe gradients", grads] == want, rank


@pytest.mark.parametrize("world", [2, 3])
def test_more_processes_than_samples_is_refused_on_every_rank(runs, world):
    for found in runs[world].values():
        assert found["too few"] == (f"the probe set of {world - 1} samples cannot be split "
                                    f"over {world} processes: use at most as many processes as "
                                    "probe samples")


def test_work_done_once_reaches_every_rank(runs):
    """Ranks.once (the spectrum of the assembled Gram): computed on rank 0 alone; its result,
    or its exception with its own type, on every rank."""
    for world, by_rank in runs.items():
        for rank, found in by_rank.items():
            assert found["once"] == ("made on", 0)
            assert found["once calls"] == ([0] if rank == 0 else []), (world, rank)
            assert found["once error"] == "non-finite value in row 3 of the Gram matrix"
