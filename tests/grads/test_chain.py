"""The plain recording pass of a chain (``sgn_lab.grads.chain``): which models it takes, and
that what it gives equals the float64 loop of single-sample backward passes
(``grads.oracle``), on its own and through the Gram path. Anything it declines takes the vmap
pass, which other test files hold to the loop.
"""

import pytest
import torch
from grads.oracle import D, check, labels
from helpers import relative_error, seeded
from torch import nn
from torch.func import vmap
from torch.nn import functional as F

from sgn_lab.grads import chain, per_sample_grads
from sgn_lab.grads.chain import chain_layers, record_chain
from sgn_lab.grads.gram import gram_result

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(*extra: nn.Module, widths=(6, 8, 3)) -> nn.Sequential:
    with seeded(0):
        layers = [nn.Linear(widths[0], widths[1]), nn.GELU(), *extra,
                  nn.Linear(widths[1], widths[2])]
        return nn.Sequential(*layers).double()


def inputs(n=7, features=6, seed=1):
    with seeded(seed):
        return torch.randn(n, features, dtype=D)


def recorded(model, x, y, loss=F.cross_entropy):
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return record_chain(model, loss, (x,), y, params)


@pytest.mark.parametrize("model", [
    mlp(),
    mlp(nn.ReLU(inplace=True), nn.Dropout(0.5).eval(), nn.Identity()),
    mlp(nn.Sequential(nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.SiLU()))),
    mlp(nn.Linear(8, 8, bias=False), nn.Hardswish(inplace=True)),
], ids=["plain", "in-place-dropout-identity", "nested", "no-bias"])
def test_chains_are_recorded_plainly_and_exactly(model):
    x, y = inputs(), labels(7)
    assert recorded(model, x, y) is not None
    coverage = check(model, x, y)
    assert set(coverage.routes.values()) <= {"ghost", "per-sample"}


def test_in_place_activations_over_positions():
    """Over positions a linear layer's output is a view of its matmul's; an in-place
    activation rebuilds the view's history, and the signal must still be the one before it."""
    with seeded(5):
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 5),
                              nn.LeakyReLU(0.1, inplace=True), nn.Flatten(),
                              nn.Linear(15, 2)).double()
        x = torch.randn(6, 3, 4, dtype=D)
    assert recorded(model, x, labels(6, 2)) is not None
    check(model, x, labels(6, 2))


def test_positions_flatten_and_frozen_parameters():
    with seeded(2):
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(),
                              nn.Linear(15, 2)).double()
        x = torch.randn(6, 3, 4, dtype=D)
    model[0].bias.requires_grad_(False)
    y = labels(6, 2)
    assert recorded(model, x, y) is not None
    coverage = check(model, x, y)
    assert coverage.routes["0.weight"] in ("ghost", "per-sample")
    assert "0.bias" not in coverage.routes


@pytest.mark.parametrize("loss", [
    nn.CrossEntropyLoss(label_smoothing=0.2), nn.CrossEntropyLoss(reduction="sum"),
    nn.MSELoss(), nn.L1Loss(reduction="sum"), F.mse_loss,
    lambda out, y: (out - y).pow(4).mean(),  # not a known loss: vmap of the loss only
], ids=["ce-smoothing", "ce-sum", "mse", "l1-sum", "mse-function", "lambda"])
def test_losses_of_a_chain(loss):
    model, x = mlp(), inputs()
    if isinstance(loss, nn.CrossEntropyLoss):
        y = labels(7)
    else:
        with seeded(3):
            y = torch.randn(7, 3, dtype=D)
    assert recorded(model, x, y, loss) is not None
    check(model, x, y, loss_fn=loss)


@pytest.mark.parametrize(("loss", "targets"), [
    (nn.CrossEntropyLoss(label_smoothing=0.1), "classes"),
    (F.cross_entropy, "probabilities"),
    (nn.CrossEntropyLoss(reduction="sum"), "classes"),
    (nn.MSELoss(), "values"),
    (nn.L1Loss(), "values"),
    (nn.MSELoss(reduction="sum"), "values"),
])
def test_batched_losses_equal_each_sample_alone(loss, targets):
    with seeded(4):
        out = torch.randn(5, 4, dtype=D)
        y = {"classes": labels(5, 4), "probabilities": torch.softmax(torch.randn(5, 4), 1),
             "values": torch.randn(5, 4)}[targets].to(out.dtype if targets != "classes"
                                                      else torch.int64)
    got = chain._row_losses(loss, out, y)
    want = torch.stack([loss(out[i:i + 1], y[i:i + 1]) for i in range(5)])
    assert got is not None and relative_error(got, want) <= 1e-14


@pytest.mark.parametrize(("loss", "out_shape", "y"), [
    (nn.CrossEntropyLoss(weight=torch.ones(4, dtype=D)), (5, 4), "classes"),
    (nn.CrossEntropyLoss(), (5, 4, 2), "classes"),  # positions: vmap of the loss
    (nn.CrossEntropyLoss(reduction="none"), (5, 4), "classes"),
    (nn.MSELoss(), (5, 1), "flat"),  # broadcast targets
])
def test_other_losses_are_left_to_vmap(loss, out_shape, y):
    out = torch.zeros(out_shape, dtype=D)
    targets = (torch.zeros((5, *out_shape[2:]), dtype=torch.int64) if y == "classes"
               else torch.zeros(5, dtype=D))
    assert chain._row_losses(loss, out, targets) is None


def test_an_ignored_target_is_reported_as_by_vmap():
    model, x = mlp(), inputs()
    y = labels(7)
    y[3] = -100
    with pytest.raises(Exception, match="non-finite loss nan for sample 3"):
        recorded(model, x, y, nn.CrossEntropyLoss())


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class MySequential(nn.Sequential):
    pass


def _with_forward_hook():
    model = mlp()
    model[1].register_forward_hook(lambda m, i, o: o - o.mean(0))  # mixes the samples
    return model


def _with_pre_hook():
    model = mlp()
    model.register_forward_pre_hook(lambda m, args: (args[0] - args[0].mean(0),))
    return model


def _tied():
    model = mlp(widths=(6, 6, 6))
    return nn.Sequential(*model, model[0])


def _with_own_forward():
    model = mlp()
    model[2].forward = lambda x: F.linear(x - x.mean(0), model[2].weight, model[2].bias)
    return model


def _derived_weight():
    """A weight that is a tensor made from another layer's parameter: that parameter has a
    second use, which only the vmap pass's graph walk sees."""
    model = mlp(widths=(6, 6, 3))
    del model[0].weight
    model[0].weight = model[2].weight.T @ model[2].weight  # a tensor made from another layer's
    return model


def _buffer_module():
    model = mlp()
    model.insert(1, nn.BatchNorm1d(8).double())
    return model


@pytest.mark.parametrize("make", [
    _with_forward_hook, _with_pre_hook, _tied, _with_own_forward, _buffer_module,
    _derived_weight,
    lambda: MySequential(*mlp()),
    lambda: nn.Sequential(MyLinear(6, 3)).double(),
    lambda: mlp(nn.Dropout(0.5)),  # draws masks: vmap draws them per sample
    lambda: mlp(nn.Softmax(dim=0)),  # not row-wise by type
    lambda: nn.Sequential(nn.Flatten(0), nn.Linear(42, 3)).double(),
    lambda: nn.Sequential(nn.Linear(6, 3), nn.MultiheadAttention(3, 1)).double(),
], ids=["forward-hook", "pre-hook", "tied", "own-forward", "batchnorm", "derived-weight",
        "sequential-subclass",
        "linear-subclass", "dropout", "softmax", "flatten-samples", "not-a-leaf"])
def test_what_is_not_a_provable_chain_takes_the_vmap_pass(make):
    assert chain_layers(make()) is None


def test_a_global_hook_sends_every_model_to_the_vmap_pass():
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert chain_layers(mlp()) is None
    finally:
        handle.remove()
    assert chain_layers(mlp()) is not None


def test_declined_chains_are_still_exact():
    """A forward hook that mixes samples: the vmap pass gives batch-of-one gradients, and the
    first-call consistency check reports the mixing rather than a Gram."""
    model, x, y = _with_forward_hook(), inputs(), labels(7)
    with pytest.raises(Exception, match="(?i)mix|batch"):
        check(model, x, y)
    tied = _tied()
    assert recorded(tied, inputs(), labels(7, 6)) is None
    check(tied, inputs(), labels(7, 6))


def test_two_inputs_or_a_one_dimensional_layer_input_are_declined():
    model = nn.Sequential(nn.Linear(1, 3)).double()
    x = torch.randn(7, dtype=D)  # Linear would contract the sample axis
    assert record_chain(model, F.cross_entropy, (x,), labels(7),
                        dict(model.named_parameters())) is None
    assert record_chain(mlp(), F.cross_entropy, (inputs(), inputs()), labels(7),
                        dict(mlp().named_parameters())) is None


def test_under_an_outer_vmap_the_chain_is_not_taken():
    model, x, y = mlp(), inputs(), labels(7)
    params = dict(model.named_parameters())
    seen = []
    vmap(lambda x: seen.append(record_chain(model, F.cross_entropy, (x,), y, params))
         or x.sum(), in_dims=1)(x.unsqueeze(1).expand(7, 2, 6))
    assert seen == [None]


def test_the_chain_and_the_vmap_pass_agree():
    """The same chain recorded plainly and, inside a wrapper module, under vmap: both equal
    the loop, and each other to rounding."""
    model, x, y = mlp(), inputs(), labels(7)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x)

    wrapped = Wrapper()
    assert chain_layers(wrapped) is None and chain_layers(model) is not None
    grams = []
    for m in (model, wrapped):
        assert set(check(m, x, y).routes.values()) <= {"ghost", "per-sample"}
        grams.append(gram_result(m, F.cross_entropy, x, y).gram)
    assert relative_error(grams[0], grams[1]) <= 1e-13


def test_a_module_registered_twice_keeps_its_parameters():
    """functional_call swaps a module listed under two paths twice; the vmap path must still
    leave the model's Parameters in place (torch 2.13 restores plain tensors by itself)."""
    model = _tied()
    before = {name: p for name, p in model.named_parameters()}
    per_sample_grads(model, F.cross_entropy, inputs(), labels(7, 6))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[k] is p and type(p) is nn.Parameter for k, p in before.items())
