"""GaussianNoiseSGD and CovarianceNoiseSGD: the published rules replayed draw by draw, the
covariance of the injected noise, state-dict round trips and input checks."""

import copy
import math

import pytest
import torch
from torch import nn

from sgn_lab.grads import flatten_grads, per_sample_grads, trainable_dim
from sgn_lab.optim.injection import CovarianceNoiseSGD, GaussianNoiseSGD
from sgn_lab.stats.noise import noise_stats

DT = torch.float64
SEED = 1234
STEPS = 25


pytestmark = pytest.mark.usefixtures("one_thread")


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------------
# GaussianNoiseSGD: the rule written out
# --------------------------------------------------------------------------------------------

# Three groups: two noisy ones with different hyperparameters, one with σ = 0 (draws nothing).
# Group 1's second parameter never gets a gradient: skipped, and it draws nothing either.
GAUSS_SHAPES = [[(3, 4), (5,)], [(2, 3), (4,)], [(3,)]]


def gaussian_groups(momentum: float) -> list[dict]:
    return [
        dict(lr=0.1, sigma=0.3, momentum=momentum, weight_decay=0.01),
        dict(lr=0.05, sigma=0.7, momentum=momentum / 2, weight_decay=0.0),
        dict(lr=0.2, sigma=0.0, momentum=momentum, weight_decay=0.02),
    ]


def run_gaussian_rule(device: str, momentum: float) -> None:
    gen = torch.Generator().manual_seed(0)
    init = [[torch.randn(s, generator=gen, dtype=DT).to(device) for s in shapes]
            for shapes in GAUSS_SHAPES]
    groups = gaussian_groups(momentum)
    params = [[leaf(t) for t in ts] for ts in init]
    opt = GaussianNoiseSGD(
        [{"params": ps, **hp} for ps, hp in zip(params, groups, strict=True)], lr=1.0, seed=SEED
    )

    replay = torch.Generator(device=device).manual_seed(SEED)
    theta = [[t.clone() for t in ts] for ts in init]
    buf: dict[tuple[int, int], torch.Tensor] = {}
    for _ in range(STEPS):
        grads = [[torch.randn(s, generator=gen, dtype=DT).to(device) for s in shapes]
                 for shapes in GAUSS_SHAPES]
        grads[1][1] = None
        for ps, gs in zip(params, grads, strict=True):
            for p, g in zip(ps, gs, strict=True):
                p.grad = None if g is None else g.clone()
        opt.step()

        for k, hp in enumerate(groups):
            for j, g in enumerate(grads[k]):
                if g is None:
                    continue
                # g̃ = g + λθ + σz, z ~ N(0, I) drawn in group order, parameter order, σ > 0 only
                g_tilde = g + hp["weight_decay"] * theta[k][j]
                if hp["sigma"] > 0:
                    z = torch.randn(theta[k][j].shape, generator=replay, dtype=DT, device=device)
                    g_tilde = g_tilde + hp["sigma"] * z
                if hp["momentum"] > 0:
                    # v ← μv + g̃, v = g̃ on the first step
                    v = g_tilde if (k, j) not in buf else hp["momentum"] * buf[k, j] + g_tilde
                    buf[k, j] = v
                    g_tilde = v
                theta[k][j] = theta[k][j] - hp["lr"] * g_tilde

        for ps, ts in zip(params, theta, strict=True):
            for p, t in zip(ps, ts, strict=True):
                torch.testing.assert_close(p.detach(), t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(params[1][1].detach(), init[1][1], rtol=0, atol=0)
    # The replayed stream is where the optimizer's is: nothing drawn beyond the documented draws.
    assert torch.equal(opt.generator.get_state(), replay.get_state())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_gaussian_rule(momentum):
    run_gaussian_rule("cpu", momentum)


# --------------------------------------------------------------------------------------------
# CovarianceNoiseSGD: the rule written out
# --------------------------------------------------------------------------------------------

N_SAMPLES = 8
COV_SHAPES = [{"a.weight": (3, 2), "a.bias": (3,)}, {"b.weight": (2, 2)}]


def covariance_groups(variants: tuple[str, str], momentum: float) -> list[dict]:
    return [
        dict(lr=0.1, small_batch=2, large_batch=8, variant=variants[0], momentum=momentum,
             weight_decay=0.01),
        dict(lr=0.05, small_batch=4, large_batch=16, variant=variants[1], momentum=momentum / 2,
             weight_decay=0.0),
    ]


def random_per_sample(gen: torch.Generator, n: int, device: str) -> dict[str, torch.Tensor]:
    """Per-sample gradients with a non-zero mean and unequal spreads."""
    out = {}
    for shapes in COV_SHAPES:
        for name, s in shapes.items():
            spread = torch.rand(s, generator=gen, dtype=DT) + 0.2
            mean = torch.randn(s, generator=gen, dtype=DT)
            out[name] = (mean + spread * torch.randn((n, *s), generator=gen, dtype=DT)).to(device)
    return out


def make_covariance(device: str, variants: tuple[str, str], momentum: float, seed: int = SEED,
                    init: list[dict[str, torch.Tensor]] | None = None):
    """The optimizer over named parameters (plus a frozen one, never in the per-sample dict)."""
    if init is None:
        gen = torch.Generator().manual_seed(0)
        init = [{name: torch.randn(s, generator=gen, dtype=DT).to(device)
                 for name, s in shapes.items()} for shapes in COV_SHAPES]
    named = [[(name, leaf(t)) for name, t in ts.items()] for ts in init]
    frozen = ("b.frozen", leaf(torch.ones(2, dtype=DT, device=device), requires_grad=False))
    named[1].append(frozen)
    groups = covariance_groups(variants, momentum)
    opt = CovarianceNoiseSGD(
        [{"params": ps, **hp} for ps, hp in zip(named, groups, strict=True)],
        lr=1.0, small_batch=1, large_batch=2, seed=seed,
    )
    return opt, named, init


def run_covariance_rule(device: str, variants: tuple[str, str], momentum: float) -> None:
    opt, named, init = make_covariance(device, variants, momentum)
    groups = covariance_groups(variants, momentum)
    n = N_SAMPLES
    gen = torch.Generator().manual_seed(1)

    replay = torch.Generator(device=device).manual_seed(SEED)
    theta = [dict(ts) for ts in init]
    buf: dict[str, torch.Tensor] = {}
    for _ in range(STEPS):
        ps = random_per_sample(gen, n, device)
        opt.step(ps)

        # One z ~ N(0, I_n) first, shared by every "full" tensor; then one z per "diagonal"
        # tensor, in group and parameter order.
        z_full = None
        if "full" in variants:
            z_full = torch.randn(n, generator=replay, dtype=DT, device=device)
        for k, hp in enumerate(groups):
            c = 1 / hp["small_batch"] - 1 / hp["large_batch"]
            for name, th in theta[k].items():
                g = ps[name]
                g_bar = sum(g[i] for i in range(n)) / n
                if hp["variant"] == "full":
                    # ξ = sqrt(c/(n−1)) Σ_i z_i (g_i − ḡ)
                    xi = math.sqrt(c / (n - 1)) * sum(z_full[i] * (g[i] - g_bar) for i in range(n))
                else:
                    # ξ = sqrt(c·diag S) ⊙ z
                    diag_s = sum((g[i] - g_bar) ** 2 for i in range(n)) / (n - 1)
                    z = torch.randn(th.shape, generator=replay, dtype=DT, device=device)
                    xi = torch.sqrt(c * diag_s) * z
                g_tilde = g_bar + hp["weight_decay"] * th + xi
                if hp["momentum"] > 0:
                    v = g_tilde if name not in buf else hp["momentum"] * buf[name] + g_tilde
                    buf[name] = v
                    g_tilde = v
                theta[k][name] = th - hp["lr"] * g_tilde

        for k, ps_k in enumerate(named):
            for name, p in ps_k:
                if name == "b.frozen":
                    assert p.grad is None
                    assert torch.equal(p, torch.ones_like(p))
                    continue
                torch.testing.assert_close(p.detach(), theta[k][name], rtol=1e-12, atol=1e-12)
                # ḡ is written to p.grad
                torch.testing.assert_close(p.grad, ps[name].mean(0), rtol=1e-12, atol=1e-14)
    assert torch.equal(opt.generator.get_state(), replay.get_state())


VARIANT_PAIRS = [("full", "full"), ("diagonal", "diagonal"), ("diagonal", "full")]


@pytest.mark.parametrize("variants", VARIANT_PAIRS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_covariance_rule(variants, momentum):
    run_covariance_rule("cpu", variants, momentum)


def test_covariance_input_forms_agree():
    """dict, list in parameter order, closure (positional and keyword): the same steps."""
    gen = torch.Generator().manual_seed(2)
    inputs = [random_per_sample(gen, N_SAMPLES, "cpu") for _ in range(5)]
    runs = {form: make_covariance("cpu", ("full", "diagonal"), 0.9) for form in range(4)}
    for ps in inputs:
        as_list = [ps[name] for shapes in COV_SHAPES for name in shapes] + [None]  # frozen last
        assert runs[0][0].step(ps) is None
        assert runs[1][0].step(as_list) is None
        assert runs[2][0].step(lambda ps=ps: ps) is ps
        assert runs[3][0].step(closure=lambda ps=ps: ps) is ps
    finals = [[p for group in named for _, p in group] for _, named, _ in runs.values()]
    for other in finals[1:]:
        assert all(torch.equal(a, b) for a, b in zip(finals[0], other, strict=True))


def test_covariance_closure_with_per_sample_grads():
    """The training-loop line: opt.step(lambda: per_sample_grads(model, loss_fn, x, y))."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=DT), torch.randint(0, 2, (16,))
    loss_fn = nn.functional.cross_entropy
    opt = CovarianceNoiseSGD(model.named_parameters(), lr=0.1, small_batch=4, large_batch=16,
                             seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    g = opt.step(lambda: per_sample_grads(model, loss_fn, x, y))
    assert set(g) == {name for name, _ in model.named_parameters()}
    for (name, p), p0 in zip(model.named_parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, g[name].mean(0), rtol=1e-12, atol=1e-15)
        assert not torch.equal(p.detach(), p0)


# --------------------------------------------------------------------------------------------
# Statistics of the injected noise
# --------------------------------------------------------------------------------------------

def assert_moments(X: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Sample mean and covariance of the rows of X within 5 standard errors of the given values.

    The SE of each covariance entry is the spread of the centred products over the sample
    (for the diagonal: the sample's own fourth moment, sqrt((m4 − v²)/R)).
    """
    R = X.shape[0]
    x_bar = X.mean(0)
    se_mean = X.std(0) / math.sqrt(R)
    z_mean = (x_bar - mean).abs() / se_mean
    assert (z_mean < 5).all(), f"mean off by {z_mean.max():.1f} SE"
    centred = X - x_bar
    products = centred[:, :, None] * centred[:, None, :]
    cov_hat = products.sum(0) / (R - 1)
    se_cov = products.std(0) / math.sqrt(R)
    z_cov = (cov_hat - cov).abs() / se_cov
    assert (z_cov < 5).all(), f"covariance off by {z_cov.max():.1f} SE:\n{cov_hat}\nvs\n{cov}"


def covariance_se(X: torch.Tensor) -> torch.Tensor:
    centred = X - X.mean(0)
    return (centred[:, :, None] * centred[:, None, :]).std(0) / math.sqrt(X.shape[0])


def test_gaussian_noise_is_isotropic_with_variance_sigma_squared():
    R, sigma = 10_000, 0.5
    a = leaf(torch.zeros(3, dtype=DT))
    b = leaf(torch.zeros(2, 1, dtype=DT))
    opt = GaussianNoiseSGD([{"params": [a]}, {"params": [b]}], lr=1.0, sigma=sigma, seed=7)
    steps = torch.empty(R, 5, dtype=DT)
    for r in range(R):
        before = torch.cat([a.detach().flatten(), b.detach().flatten()])
        a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        opt.step()
        steps[r] = torch.cat([a.detach().flatten(), b.detach().flatten()]) - before
    assert_moments(steps, torch.zeros(5, dtype=DT), sigma**2 * torch.eye(5, dtype=DT))


# n = 20 fixed per-sample gradients in d = 4 (two tensors of 2, in two groups), with strong
# correlations inside and across the tensors.
MIX = torch.tensor(
    [[1.0, 0.0, 0.0, 0.0], [0.8, 0.6, 0.0, 0.0], [0.5, -0.4, 0.7, 0.0], [-0.6, 0.3, 0.2, 0.5]],
    dtype=DT,
)


def covariance_noise_samples(variant: str, R: int):
    gen = torch.Generator().manual_seed(3)
    n, small, large = 20, 4, 20
    G = torch.randn(n, 4, generator=gen, dtype=DT) @ MIX.T + torch.tensor([1.0, -2, 0.5, 3])
    G_bar = G.sum(0) / n
    S = (G - G_bar).T @ (G - G_bar) / (n - 1)
    c = 1 / small - 1 / large

    a = leaf(torch.zeros(2, dtype=DT))
    b = leaf(torch.zeros(2, dtype=DT))
    opt = CovarianceNoiseSGD([{"params": [("a", a)]}, {"params": [("b", b)]}], lr=1.0,
                             small_batch=small, large_batch=large, variant=variant, seed=11)
    per_sample = {"a": G[:, :2], "b": G[:, 2:]}
    xi = torch.empty(R, 4, dtype=DT)
    for r in range(R):
        before = torch.cat([a.detach(), b.detach()])
        opt.step(per_sample)
        xi[r] = before - torch.cat([a.detach(), b.detach()]) - G_bar  # Δθ = −(ḡ + ξ)
    return xi, c * S


def test_full_covariance_noise_has_covariance_c_times_s():
    xi, cS = covariance_noise_samples("full", R=6000)
    assert_moments(xi, torch.zeros(4, dtype=DT), cS)
    # The cross-parameter block (tensor a × tensor b) on its own: c·S's off-diagonal block,
    # which is far from 0 here, so noise drawn independently per tensor would fail this.
    se = covariance_se(xi)
    assert (cS[:2, 2:].abs() / se[:2, 2:]).max() > 20
    centred = xi - xi.mean(0)
    cross = centred[:, :2].T @ centred[:, 2:] / (xi.shape[0] - 1)
    assert ((cross - cS[:2, 2:]).abs() < 5 * se[:2, 2:]).all()


def test_diagonal_covariance_noise_has_covariance_c_times_diag_s():
    xi, cS = covariance_noise_samples("diagonal", R=6000)
    assert_moments(xi, torch.zeros(4, dtype=DT), torch.diag(torch.diag(cS)))
    # The off-diagonal entries of c·S are many SEs from 0: "full" noise would fail this.
    se = covariance_se(xi)
    off = ~torch.eye(4, dtype=torch.bool)
    assert (cS.abs() / se)[off].max() > 20


# --------------------------------------------------------------------------------------------
# set_sigma_from_trace
# --------------------------------------------------------------------------------------------

def test_set_sigma_from_trace():
    a, b = leaf(torch.zeros(3, 4, dtype=DT)), leaf(torch.zeros(5, dtype=DT))
    opt = GaussianNoiseSGD([{"params": [a], "sigma": 0.1}, {"params": [b]}], lr=0.1, sigma=0.2)
    sigma = opt.set_sigma_from_trace(3.4)
    assert sigma**2 == pytest.approx(3.4 / 17, rel=1e-15)
    assert [group["sigma"] for group in opt.param_groups] == [sigma, sigma]
    assert opt.defaults["sigma"] == sigma
    opt.set_sigma_from_trace(3.4, dim=10)
    assert [group["sigma"] ** 2 for group in opt.param_groups] == pytest.approx([0.34, 0.34])
    assert opt.set_sigma_from_trace(0.0) == 0.0
    with pytest.raises(ValueError, match=r"trace must .*, got -1\.0$"):
        opt.set_sigma_from_trace(-1.0)
    with pytest.raises(ValueError, match=r"dim must .*, got 0$"):
        opt.set_sigma_from_trace(1.0, dim=0)


def test_set_sigma_from_noise_stats_matches_the_minibatch_trace():
    """The documented pairing: σ²·d = tr Cov[g_B] = tr(S)·(1/B − 1/N)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(32, 3, dtype=DT), torch.randint(0, 2, (32,))
    G = flatten_grads(per_sample_grads(model, nn.functional.cross_entropy, x, y))
    stats = noise_stats(G, batch_size=4, dataset_size=32, shape=False)
    opt = GaussianNoiseSGD(model.parameters(), lr=0.1, seed=0)
    sigma = opt.set_sigma_from_trace(stats.minibatch_trace)
    trace_s = ((G - G.mean(0)) ** 2).sum() / (32 - 1)
    assert sigma**2 * trainable_dim(model) == pytest.approx(
        float(trace_s) * (1 / 4 - 1 / 32), rel=1e-10
    )


# --------------------------------------------------------------------------------------------
# state_dict round trips
# --------------------------------------------------------------------------------------------

def test_gaussian_state_dict_round_trip():
    gen = torch.Generator().manual_seed(5)
    params = [leaf(torch.randn(3, 2, dtype=DT)), leaf(torch.randn(4, dtype=DT))]

    def build(ps, seed):
        return GaussianNoiseSGD([{"params": [ps[0]]}, {"params": [ps[1]], "sigma": 0.5}],
                                lr=0.1, sigma=0.2, momentum=0.9, weight_decay=0.01, seed=seed)

    def step(opt, ps, grads):
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()

    grads = [[torch.randn(p.shape, generator=gen, dtype=DT) for p in params] for _ in range(17)]
    opt = build(params, SEED)
    for gs in grads[:7]:
        step(opt, params, gs)
    saved = copy.deepcopy(opt.state_dict())
    copies = copy.deepcopy(params)
    resumed = build(copies, seed=999)
    resumed.load_state_dict(saved)
    unloaded_copies = copy.deepcopy(params)
    unloaded = build(unloaded_copies, seed=999)
    for gs in grads[7:]:
        step(opt, params, gs)
        step(resumed, copies, gs)
        step(unloaded, unloaded_copies, gs)
        assert all(torch.equal(p, q) for p, q in zip(params, copies, strict=True))
    # Without the generator state the draws differ: the check above can fail.
    assert not torch.equal(params[0], unloaded_copies[0])


def test_covariance_state_dict_round_trip():
    gen = torch.Generator().manual_seed(6)
    inputs = [random_per_sample(gen, N_SAMPLES, "cpu") for _ in range(17)]
    opt, named, _ = make_covariance("cpu", ("full", "diagonal"), 0.9)
    for ps in inputs[:7]:
        opt.step(ps)
    saved = copy.deepcopy(opt.state_dict())
    current = [{name: p.detach().clone() for name, p in group[:len(COV_SHAPES[k])]}
               for k, group in enumerate(named)]
    resumed, named_copy, _ = make_covariance("cpu", ("full", "diagonal"), 0.9, seed=999,
                                             init=current)
    resumed.load_state_dict(saved)
    for ps in inputs[7:]:
        opt.step(ps)
        resumed.step(ps)
        for group, group_copy in zip(named, named_copy, strict=True):
            assert all(torch.equal(p, q) for (_, p), (_, q) in zip(group, group_copy, strict=True))
    assert saved["state"]  # momentum buffers travelled too


# --------------------------------------------------------------------------------------------
# Invalid hyperparameters and inputs
# --------------------------------------------------------------------------------------------

def one_param():
    return [leaf(torch.zeros(2, dtype=DT))]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-0.1), r"lr must .*, got -0\.1$"),
        (dict(lr=0.1, sigma=-1.0), r"sigma must .*, got -1\.0$"),
        (dict(lr=0.1, momentum=1.0), r"momentum must .*, got 1\.0$"),
        (dict(lr=0.1, weight_decay=-0.5), r"weight_decay must .*, got -0\.5$"),
        (dict(lr=0.1, seed=-3), r"seed must .*, got -3$"),
    ],
)
def test_gaussian_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianNoiseSGD(one_param(), **kwargs)


def test_gaussian_invalid_group_override():
    with pytest.raises(ValueError, match=r"sigma must .*, got -2$"):
        GaussianNoiseSGD([{"params": one_param()}, {"params": one_param(), "sigma": -2}], lr=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), r"lr must .*, got -1\.0$"),
        (dict(small_batch=32, large_batch=32), r"small_batch must be .* large_batch=32, got 32"),
        (dict(small_batch=64, large_batch=32), r"small_batch must be .* large_batch=32, got 64"),
        (dict(small_batch=0), r"small_batch must .*, got 0$"),
        (dict(small_batch=True), r"small_batch must .*, got True$"),
        (dict(large_batch=2.5), r"large_batch must .*, got 2\.5$"),
        (dict(variant="foo"), r"variant must be one of full, diagonal, got 'foo'$"),
        (dict(momentum=-0.1), r"momentum must .*, got -0\.1$"),
        (dict(weight_decay=-1.0), r"weight_decay must .*, got -1\.0$"),
    ],
)
def test_covariance_invalid_hyperparameters(kwargs, match):
    full = dict(lr=0.1, small_batch=4, large_batch=16) | kwargs
    with pytest.raises(ValueError, match=match):
        CovarianceNoiseSGD(one_param(), **full)


def test_covariance_invalid_group_override():
    with pytest.raises(ValueError, match=r"variant must .*, got 'bar'$"):
        CovarianceNoiseSGD([{"params": one_param(), "variant": "bar"}], lr=0.1, small_batch=4,
                           large_batch=16)


def bad_inputs():
    gen = torch.Generator().manual_seed(4)
    good = random_per_sample(gen, N_SAMPLES, "cpu")
    as_list = [good[name] for shapes in COV_SHAPES for name in shapes] + [None]
    return [
        ({**good, "a.weight": torch.zeros(8, 2, 3, dtype=DT)},
         r"parameter 'a\.weight': shape \(8, 2, 3\) \(must be \(n, 3, 2\)"),
        ({**good, "a.bias": torch.zeros(3, dtype=DT)}, r"parameter 'a\.bias': shape \(3,\)"),
        ({name: g[:1] for name, g in good.items()}, r"n=1 sample"),
        ({**good, "a.bias": good["a.bias"][:5]}, r"numbers of samples differ.*'a\.bias': 5"),
        ({k: v for k, v in good.items() if k != "a.bias"}, r"no gradients for parameter 'a\.bias'"),
        ({**good, "zzz": good["a.bias"]}, r"not in this optimizer: \['zzz'\]"),
        (as_list[:-1], r"3 entries for the 4 parameters"),
        ([None] * 4, r"no gradient for any parameter"),
        (good["a.bias"], r"invalid per_sample: a Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_covariance_invalid_per_sample_is_named_and_moves_nothing(case):
    per_sample, match = bad_inputs()[case]
    opt, named, _ = make_covariance("cpu", ("full", "diagonal"), 0.0)
    before = [p.detach().clone() for group in named for _, p in group]
    with pytest.raises(ValueError, match=match):
        opt.step(per_sample)
    after = [p.detach() for group in named for _, p in group]
    assert all(torch.equal(p, q) for p, q in zip(before, after, strict=True))


def test_covariance_step_input_errors():
    a = leaf(torch.zeros(2, dtype=DT))
    unnamed = CovarianceNoiseSGD([a], lr=0.1, small_batch=2, large_batch=8)
    with pytest.raises(ValueError, match=r"named_parameters"):
        unnamed.step({"a": torch.zeros(8, 2, dtype=DT)})
    unnamed.step([torch.randn(8, 2, dtype=DT)])  # a list in parameter order works unnamed
    with pytest.raises(ValueError, match=r"needs the per-sample gradients"):
        unnamed.step()
    with pytest.raises(ValueError, match=r"not both"):
        unnamed.step([torch.zeros(8, 2, dtype=DT)], closure=lambda: None)
    local = CovarianceNoiseSGD(
        [{"params": list(nn.Linear(2, 2).named_parameters())},
         {"params": list(nn.Linear(2, 2).named_parameters())}],
        lr=0.1, small_batch=2, large_batch=8,
    )
    with pytest.raises(ValueError, match=r"\['bias', 'weight'\] appear more than once"):
        local.step({"weight": torch.zeros(8, 2, 2)})


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rules_on_cuda(momentum):
    run_gaussian_rule("cuda", momentum)
    for variants in VARIANT_PAIRS:
        run_covariance_rule("cuda", variants, momentum)
