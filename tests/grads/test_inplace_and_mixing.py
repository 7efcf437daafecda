"""In-place operations and aliasing in the recording pass, the consistency check of forwards
that mix samples, the default spot check of the Gram path, and bad option values.

Every number is checked against ``helpers.loop_matrix`` (a Python loop of single-sample
backward passes, float64), never against sgn_lab itself, on both paths: the Gram
(``gram_result`` with its mean) and ``per_sample_grads`` (its G Gᵀ).

- In-place writes into a kept operand (``h.mul_(γ)``, ``h *= γ``, timm's
  ``LayerScale(inplace=True)``, ``x.mul(g).add_(b).mul_(g)``) keep the fast routes, exactly.
- One tensor as two operands of one op (``F.linear(W, W)``, ``torch.mul(p, p)``) and a
  parameter used both by a rule and inside TorchScript take the exact vmap route.
- Forwards that mix samples (``h - h.mean(0)``, functional batch norm with batch statistics,
  in-batch negatives, ``scale_grad_by_freq``) are a SampleMixingError on both paths, a
  SampleMixingWarning with ``samples="batch-of-one"`` (and then equal the loop); dropout is
  no false alarm; the check leaves ``.grad``, buffers, train flags and the RNG alone; it is
  cached per model and structure.
- A wrong rule is caught by the default first-call spot check (GramMismatchError).
"""

import warnings
from dataclasses import replace

import pytest
import torch
from grads.oracle import D, check, labels
from helpers import loop_matrix, relative_error, seeded
from torch import nn
from torch.nn import functional as F

import sgn_lab.grads.rules as rules
from sgn_lab.grads import (
    GramMismatchError,
    SampleMixingError,
    SampleMixingWarning,
    flatten_grads,
    gram_result,
    per_sample_grads,
)
from sgn_lab.grads.consistency import check_independent

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ("ghost", "per-sample")


# --- A(1): an operand that the in-place operation itself writes ----------------------------


class InPlaceScale(nn.Module):
    """A learned scale multiplied into a linear layer's output in place."""

    def __init__(self, pattern):
        super().__init__()
        self.pattern = pattern
        self.lin = nn.Linear(4, 6)
        self.gamma = nn.Parameter(torch.randn(6))
        self.beta = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(torch.tanh(x))  # nothing saves h for its backward: writable
        if self.pattern == "mul_":
            h.mul_(self.gamma)
        elif self.pattern == "imul":
            h *= self.gamma
        else:  # "chain": the scale twice, a shift in between, both in place
            h = h.mul(self.gamma).add_(self.beta).mul_(self.gamma)
        return self.head(torch.tanh(h))


class LayerScale(nn.Module):
    """timm's ``LayerScale(dim, inplace=True)``."""

    def __init__(self, dim, init_values=0.5, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class Block(nn.Module):
    """A pre-norm MLP block with timm's in-place LayerScale on its residual branch."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 6)
        self.ls = LayerScale(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x (n, T, 6)
        x = x + self.ls(self.fc2(F.gelu(self.fc1(self.norm(x)))))
        return self.head(x.mean(dim=1))


@pytest.mark.parametrize("pattern", ["mul_", "imul", "chain"])
def test_a_scale_multiplied_in_place_stays_exact_on_the_fast_routes(pattern):
    with seeded(0):
        model = InPlaceScale(pattern).double()
        x = torch.randn(7, 4, dtype=D)
    coverage = check(model, x, labels(7), vmap=True)
    assert coverage.routes["gamma"] in FAST
    assert coverage.routes["lin.weight"] in FAST
    if pattern == "chain":
        assert coverage.routes["beta"] in FAST
    assert coverage.names("vmap") == [] and coverage.names("loop") == []


def test_timm_layerscale_inplace():
    with seeded(1):
        model = Block().double()
        x = torch.randn(6, 5, 6, dtype=D)
    coverage = check(model, x, labels(6), vmap=True)
    assert coverage.routes["ls.gamma"] in FAST
    assert coverage.routes["fc2.weight"] in FAST
    assert coverage.names("vmap") == [] and coverage.names("loop") == []


# --- A(2), A(3): one tensor in two operand positions; a use no rule sees ------------------


class SelfProducts(nn.Module):
    """``F.linear(W, W)`` = W Wᵀ and ``torch.mul(p, p)``: one tensor as both operands."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.p = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(x @ F.linear(self.w, self.w))
        return self.head(h * torch.mul(self.p, self.p))


def test_one_tensor_as_both_operands_takes_the_exact_vmap_route():
    with seeded(2):
        model = SelfProducts().double()
        x = torch.randn(7, 4, dtype=D)
    coverage = check(model, x, labels(7), vmap=True)
    assert coverage.routes["w"] == "vmap"
    assert coverage.routes["p"] == "vmap"
    assert coverage.routes["head.weight"] in FAST


@torch.jit.script
def scripted_scale(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return h * g


class SeenAndUnseen(nn.Module):
    """Parameters used by a recognised op and again inside a TorchScript function."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.g = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x)) * self.g  # the mul rule sees g, linear sees lin.bias
        h = scripted_scale(torch.tanh(h), self.g)  # ... and no rule sees these uses
        return self.head(scripted_scale(h, self.lin.bias))


def test_a_parameter_also_used_where_no_rule_sees_takes_vmap_whole():
    with seeded(3):
        model = SeenAndUnseen().double()
        x = torch.randn(7, 4, dtype=D)
    coverage = check(model, x, labels(7), vmap=True)
    frame = coverage.to_frame().set_index("name")
    for name in ("g", "lin.bias"):
        assert frame.loc[name, "route"] == "vmap"
        assert "TorchScript" in frame.loc[name, "reason"]
    assert coverage.routes["lin.weight"] in FAST


# --- B: forwards that mix samples -----------------------------------------------------------


class Centred(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(h - 0.5 * h.mean(0, keepdim=True))


class BatchStatistics(nn.Module):
    """Batch norm with batch statistics in the user's own functional code."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.scale = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x (n, 2, 8)
        h = F.batch_norm(self.conv(x), None, None, weight=self.scale, training=True)
        return self.head(torch.tanh(h).mean(dim=-1))


class InBatchNegatives(nn.Module):
    """Contrastive logits against the batch's own keys (and a small learned memory)."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 5), nn.Linear(4, 5)
        self.memory = nn.Parameter(torch.randn(3, 5))

    def forward(self, x, z):
        q = self.q(x)
        return torch.cat([q @ self.k(z).T, q @ self.memory.T], dim=1)


def contrastive(logits, _):
    """Sample i's positive is key i: labels arange(n) over the batch."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0]))


class FrequencyScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 4, scale_grad_by_freq=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(dim=1))


def mixing_cases():
    """(id, make (model, inputs, targets), loss, what the message names)."""

    def centred():
        return Centred().double(), torch.randn(6, 4, dtype=D), labels(6)

    def batch_norm():
        return BatchStatistics().double(), torch.randn(6, 2, 8, dtype=D), labels(6)

    def in_batch():
        return (InBatchNegatives().double(),
                (torch.randn(6, 4, dtype=D), torch.randn(6, 4, dtype=D)),
                torch.zeros(6, dtype=torch.long))

    def frequency():
        return FrequencyScaled().double(), torch.randint(0, 5, (6, 7)), labels(6)

    loss = r"sample \d+'s loss is .* in a batch of 6 and .* alone"
    return [
        ("centred", centred, F.cross_entropy, loss),
        ("batch-norm", batch_norm, F.cross_entropy, loss),
        ("in-batch-negatives", in_batch, contrastive, loss),
        ("scale-grad-by-freq", frequency, F.cross_entropy,
         r"gradient of the loss of a batch of 6 differs from the mean"),
    ]


MIXING = [pytest.param(*case[1:], id=case[0]) for case in mixing_cases()]


def built(make, seed=4):
    """A fresh model (the check is remembered per model) and its data."""
    with seeded(seed):
        return make()


def gram_path(model, loss_fn, x, y, **options):
    return gram_result(model, loss_fn, x, y, with_mean=True, **options)


PATHS = [pytest.param(gram_path, id="gram"), pytest.param(per_sample_grads, id="vmap")]


@pytest.mark.parametrize("compute", PATHS)
@pytest.mark.parametrize(("make", "loss_fn", "message"), MIXING)
def test_a_forward_that_mixes_samples_is_refused(compute, make, loss_fn, message):
    model, x, y = built(make)
    with pytest.raises(SampleMixingError, match=message) as raised:
        compute(model, loss_fn, x, y)
    assert isinstance(raised.value, ValueError)
    assert "samples='batch-of-one'" in str(raised.value)


@pytest.mark.parametrize(("make", "loss_fn", "message"), MIXING)
def test_batch_of_one_warns_and_equals_the_loop(make, loss_fn, message):
    model, x, y = built(make)
    with pytest.warns(SampleMixingWarning, match=message):
        result = gram_result(model, loss_fn, x, y, with_mean=True, samples="batch-of-one")
    with pytest.warns(SampleMixingWarning, match=message):
        grads = per_sample_grads(model, loss_fn, x, y, samples="batch-of-one")
    want = loop_matrix(model, loss_fn, x, y)  # each sample alone: a batch of one
    assert relative_error(result.gram, want @ want.T) <= 1e-10
    assert relative_error(result.mean, want.mean(dim=0)) <= 1e-10
    assert relative_error(flatten_grads(grads), want) <= 1e-10


def test_a_mixing_model_first_seen_as_batch_of_one_is_still_refused_as_independent():
    # The batch-of-one call warned: the model was never found independent, so a later call
    # that asks for independent gradients must still be refused.
    for compute in (gram_path, per_sample_grads):
        with seeded(5):
            model, x, y = Centred().double(), torch.randn(6, 4, dtype=D), labels(6)
        with pytest.warns(SampleMixingWarning):
            compute(model, F.cross_entropy, x, y, samples="batch-of-one")
        with pytest.raises(SampleMixingError):
            compute(model, F.cross_entropy, x, y)


def dropout_model():
    with seeded(6):
        return nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.ReLU(),
                             nn.Linear(16, 3)).double()


@pytest.mark.parametrize("compute", PATHS)
def test_dropout_is_no_false_alarm(compute):
    model, x, y = dropout_model(), torch.randn(8, 5, dtype=D), labels(8)
    assert model.training
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleMixingWarning)
        compute(model, F.cross_entropy, x, y)  # verify=None: the first call checks
        compute(model, F.cross_entropy, x, y, verify=8)
    assert model.training and model[1].training


class Counting(nn.Module):
    """Dropout, a submodule frozen in eval mode and a buffer counting forward passes."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh())
        self.frozen = nn.Dropout(0.5).eval()
        self.head = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.head(self.frozen(self.body(x)))


def with_grads(model):
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    return {name: (p.grad, p.grad.clone()) for name, p in model.named_parameters()}


def assert_grads_kept(model, kept):
    for name, p in model.named_parameters():
        assert p.grad is kept[name][0] and torch.equal(p.grad, kept[name][1]), name


def test_the_check_leaves_grads_buffers_modes_and_rng_untouched():
    with seeded(7):
        model = Counting().double()
        x = torch.randn(6, 4, dtype=D)
    kept = with_grads(model)
    model.calls.fill_(3)
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    check_independent(model, F.cross_entropy, (x,), labels(6), count=6)  # 7 forward passes
    assert_grads_kept(model, kept)
    assert model.calls.item() == 3
    assert [m.training for m in model.modules()] == modes
    assert model.training and not model.frozen.training
    assert torch.equal(torch.get_rng_state(), rng)


def checked_and_unchecked(compute):
    """The same call on a dropout model with verify=0 and verify=4, each from seed 8 and the
    user's .grad set: [(rng state after, .grad kept, train flags after)] of the two calls."""
    x, y = torch.randn(6, 5, dtype=D), labels(6)
    out = []
    for verify in (0, 4):
        model = dropout_model()
        model[3].eval()
        kept = with_grads(model)
        with seeded(8):
            compute(model, F.cross_entropy, x, y, verify=verify)
            rng = torch.get_rng_state()
        assert_grads_kept(model, kept)
        out.append((rng, [m.training for m in model.modules()]))
    return out


@pytest.mark.parametrize("compute", PATHS)
def test_a_checked_call_keeps_grads_and_modes(compute):
    for _, modes in checked_and_unchecked(compute):
        assert modes == [True, True, True, True, False]


def test_a_checked_per_sample_grads_call_draws_what_an_unchecked_one_draws():
    (unchecked, _), (checked, _) = checked_and_unchecked(per_sample_grads)
    assert torch.equal(checked, unchecked)


def test_a_checked_gram_call_draws_what_an_unchecked_one_draws():
    # verify=4 runs the spot check and the consistency check; neither may move torch's
    # global generator beyond what the unchecked call's own dropout draws.
    (unchecked, _), (checked, _) = checked_and_unchecked(gram_path)
    assert torch.equal(checked, unchecked)


def test_a_checked_gram_call_leaves_a_counting_buffer_as_an_unchecked_one():
    x, y = torch.randn(6, 4, dtype=D), labels(6)
    counts = []
    for verify in (0, 4):
        with seeded(9):
            model = Counting().double().eval()  # no random draws: no second recording pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the spot check's vmap refuses the buffer write
            gram_result(model, F.cross_entropy, x, y, verify=verify)
        counts.append(model.calls.item())
    assert counts[0] == counts[1]


class Switchable(nn.Module):
    """Mixes samples once a plain Python attribute says so: nothing in its structure shows."""

    def __init__(self):
        super().__init__()
        self.mix = False
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if self.mix:
            h = h - 0.5 * h.mean(0, keepdim=True)
        return self.head(h)


def switched(seed=10):
    with seeded(seed):
        return Switchable().double(), torch.randn(6, 4, dtype=D), labels(6)


@pytest.mark.parametrize("compute", PATHS)
def test_the_check_is_cached_per_model_and_verify_k_always_runs_it(compute):
    model, x, y = switched()
    compute(model, F.cross_entropy, x, y)  # clean: checked and remembered
    model.mix = True
    compute(model, F.cross_entropy, x, y)  # verify=None: not checked again
    with pytest.raises(SampleMixingError):
        compute(model, F.cross_entropy, x, y, verify=4)
    other, _, _ = switched()  # another model is checked on its own first call
    other.mix = True
    with pytest.raises(SampleMixingError):
        compute(other, F.cross_entropy, x, y)


@pytest.mark.parametrize("change", ["eval", "float32"])
@pytest.mark.parametrize("compute", PATHS)
def test_a_change_of_structure_checks_again(compute, change):
    model, x, y = switched()
    compute(model, F.cross_entropy, x, y)
    model.mix = True
    if change == "eval":
        model.eval()
    else:
        model.float()
        x = x.float()
    with pytest.raises(SampleMixingError):
        compute(model, F.cross_entropy, x, y)


def test_verify_zero_turns_the_check_off():
    model, x, y = switched()
    model.mix = True
    gram_result(model, F.cross_entropy, x, y, verify=0)
    per_sample_grads(model, F.cross_entropy, x, y, verify=0)
    with pytest.raises(SampleMixingError):  # still unchecked, so the default checks it
        per_sample_grads(model, F.cross_entropy, x, y)


# --- C: the default spot check of the Gram path --------------------------------------------


def break_linear(monkeypatch, factor=1.01):
    """Make the linear rule's terms ``factor`` times too large."""
    real = rules.RULES[F.linear]

    def scaled_plan(op):
        plan = real.plan(op)
        inner = plan.terms

        def terms_(saved, signal):
            return inner(saved, signal * factor)

        return rules.Plan(plan.takes, plan.declined, plan.keep, plan.sample, terms_)

    monkeypatch.setitem(rules.RULES, F.linear, replace(real, plan=scaled_plan))


def mlp(seed=11):
    with seeded(seed):
        return (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(),
                torch.randn(6, 4, dtype=D), labels(6))


def test_the_first_call_spot_checks_the_gram(monkeypatch):
    break_linear(monkeypatch)
    model, x, y = mlp()
    with pytest.raises(GramMismatchError, match=r"0\.weight"):
        gram_result(model, F.cross_entropy, x, y)
    with pytest.raises(GramMismatchError):  # not remembered as checked
        gram_result(model, F.cross_entropy, x, y)
    unchecked = gram_result(model, F.cross_entropy, x, y, verify=0)
    want = loop_matrix(model, F.cross_entropy, x, y)
    assert relative_error(unchecked.gram, want @ want.T) > 1e-3  # the break is real


def test_later_calls_skip_the_spot_check(monkeypatch):
    model, x, y = mlp()
    K = gram_result(model, F.cross_entropy, x, y).gram  # checked, correct
    want = loop_matrix(model, F.cross_entropy, x, y)
    assert relative_error(K, want @ want.T) <= 1e-10
    break_linear(monkeypatch)
    gram_result(model, F.cross_entropy, x, y)  # verify=None: remembered, not checked
    with pytest.raises(GramMismatchError):
        gram_result(model, F.cross_entropy, x, y, verify=4)


# --- bad values -----------------------------------------------------------------------------


@pytest.mark.parametrize("compute", PATHS)
@pytest.mark.parametrize(("option", "value", "shown"), [
    ("samples", "nope", "'nope'"),
    ("verify", -1, "-1"),
    ("verify", True, "True"),
])
def test_bad_option_values_are_named(compute, option, value, shown):
    model, x, y = mlp()
    with pytest.raises(ValueError, match=rf"{option} must .*got {shown}"):
        compute(model, F.cross_entropy, x, y, **{option: value})
