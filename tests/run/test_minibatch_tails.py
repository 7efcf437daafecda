"""The minibatch-tails instrument: the shape of g_B − ḡ at each minibatch size, in metrics rows.

Its numbers must be exactly those of :func:`sgn_lab.minibatch_noise_shape` on the probe's own
per-sample gradients (recomputed here independently of the instrument) with the measurement's
STATS seed, on both per-sample-gradient paths.
"""

import math

import pytest
import torch
from torch import nn

from sgn_lab import flatten_grads, minibatch_noise_shape, per_sample_grads
from sgn_lab.run import NoiseProbe
from sgn_lab.run.instruments import INSTRUMENTS, MinibatchTails
from sgn_lab.seeds import Purpose, seed_for

SHAPE = ("tail_index", "normality_pvalue", "normality_reject_fraction", "kurtosis")
LOSS = nn.functional.cross_entropy


def problem():
    torch.manual_seed(0)
    x, y = torch.randn(200, 5, dtype=torch.float64), torch.randint(0, 3, (200,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, x, y


def columns(sizes):
    return {f"{c}_b{b}" for b in sizes for c in SHAPE}


def probe(grads="vmap", **options):
    model, x, y = problem()
    settings = dict(every=1, samples=48, seed=3, instruments=["minibatch-tails"], grads=grads,
                    shape_batch_sizes=(1, 4, 16), shape_draws=64)
    return NoiseProbe(model, LOSS, x, y, **{**settings, **options})


def expected(p, step, count):
    """minibatch_noise_shape on the first ``count`` probe samples' gradients, from scratch."""
    idx = p.probe_indices(step)[:count]
    G = flatten_grads(per_sample_grads(p.model, LOSS, p.x_train[idx], p.y_train[idx]))
    tails = next(i for i in p.instruments if i.name == "minibatch-tails")
    sizes = [b for b in tails.batch_sizes if b < count]
    table = minibatch_noise_shape(G.double(), sizes, draws=tails.draws,
                                  seed=seed_for(p.seed, step, Purpose.STATS))
    return {f"{c}_b{r['batch_size']}": r[c] for r in table.to_dict("records") for c in SHAPE}


def test_registered_with_its_name_and_no_need_for_materialised_grads():
    assert isinstance(INSTRUMENTS["minibatch-tails"], MinibatchTails)
    assert not MinibatchTails().needs_grads
    assert list(INSTRUMENTS).index("minibatch-tails") == list(INSTRUMENTS).index("tails") + 1


@pytest.mark.parametrize(("grads", "options", "count"), [
    ("vmap", {}, 48),  # all n probe samples
    ("gram", {"shape_samples": 32}, 32),  # the first shape_samples of them
])
def test_equals_minibatch_noise_shape_on_the_probe_gradients(grads, options, count):
    p = probe(grads, **options)
    assert p.grads == grads
    row = p.measure(5).row
    assert columns((1, 4, 16)) <= set(row)
    assert not set(SHAPE) & set(row)  # no per-sample (tails) columns
    want = expected(p, 5, count)
    assert set(want) == columns((1, 4, 16))
    for key, value in want.items():
        assert row[key] == value, key  # the same gradients and seed: bit for bit
    assert all(math.isfinite(row[k]) for k in want)
    # Another step draws other minibatches (another STATS seed) from the same probe set.
    again = p.measure(6).row
    assert again["normality_pvalue_b4"] != row["normality_pvalue_b4"]


def test_vmap_and_gram_agree_when_gram_uses_every_probe_sample():
    vmap = probe("vmap").measure(2).row
    gram = probe("gram", shape_samples=48).measure(2).row
    for key in columns((1, 4, 16)):
        assert gram[key] == pytest.approx(vmap[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize(("grads", "options"), [("vmap", {}), ("gram", {"shape_samples": 16})])
def test_a_batch_size_not_below_the_gradients_available_is_nan(grads, options):
    # vmap: 48 per-sample gradients, so B = 48 and 64 are NaN; gram: 16, so B = 16 is too.
    sizes = (1, 4, 16, 48, 64)
    row = probe(grads, shape_batch_sizes=sizes, **options).measure(0).row
    assert set(row) >= columns(sizes)
    available = 48 if grads == "vmap" else 16
    for b in sizes:
        values = [row[f"{c}_b{b}"] for c in SHAPE]
        if b < available:
            assert all(math.isfinite(v) for v in values), b
        else:
            assert all(math.isnan(v) for v in values), b


def test_fewer_than_eight_gradients_give_nan_everywhere():
    row = probe("gram", shape_samples=6, shape_batch_sizes=(1, 2)).measure(0).row
    assert all(math.isnan(row[k]) for k in columns((1, 2)))


def test_the_same_numbers_alongside_other_instruments():
    alone = probe().measure(4).row
    together = probe(instruments=["sgn", "tails", "minibatch-tails", "eval"]).measure(4).row
    assert set(SHAPE) <= set(together)
    for key in columns((1, 4, 16)):
        assert together[key] == alone[key], key


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="shape_draws"):
        probe(shape_draws=4)
    with pytest.raises(ValueError, match="shape_batch_sizes"):
        probe(shape_batch_sizes=(0, 4))
