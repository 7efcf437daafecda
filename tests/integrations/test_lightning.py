"""SGNCallback in a real lightning.Trainer: a tiny MLP on random data, on the CPU.

The recorded numbers are checked against noise_stats(per_sample_grads(...)) of the weights a
second callback saved at each step, and training with the callback against training without.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import sgn_lab

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning_snapshots import Snapshots  # noqa: E402

from sgn_lab.integrations.lightning import SGNCallback  # noqa: E402
from sgn_lab.run.rundir import RunDirError, locked  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

IDENTITY = ["run", "label", "task", "model", "method", "seed", "lr", "batch_size"]
N_TRAIN, BATCH = 64, 8


class MLP(pl.LightningModule):
    """Two layers, cross entropy as the loss_fn attribute the callback falls back to."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(16, 3))
        self.loss_fn = F.cross_entropy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class NoLoss(MLP):
    def __init__(self) -> None:
        super().__init__()
        del self.loss_fn

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


class Greedy:
    """A user's instrument that draws from every global generator."""

    name, needs_grads = "greedy", False

    def __call__(self, measurement) -> dict[str, float]:
        return {"draw": float(torch.rand(())) + np.random.rand() + random.random()}  # noqa: NPY002


class Before(pl.Callback):
    """Put before SGNCallback: what a measurement must leave as it was."""

    def __init__(self) -> None:
        self.state = None

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.state = ({k: None if p.grad is None else p.grad.clone()
                       for k, p in module.named_parameters()},
                      [m.training for m in module.modules()], torch.get_rng_state())


class After(pl.Callback):
    """Put after SGNCallback: compares with Before, and counts the measurements."""

    def __init__(self, before: Before, sgn: SGNCallback) -> None:
        self.before, self.sgn = before, sgn
        self.measured: list[tuple[int, int]] = []  # (global_step, batch_idx) measured at
        self.batch_ends = 0
        self._count = 0

    def on_train_start(self, trainer, module) -> None:
        self._count = len(self.sgn.session.steps)  # the measurement at step 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batch_ends += 1
        grads, modes, rng = self.before.state
        for k, p in module.named_parameters():
            assert (p.grad is None) == (grads[k] is None)
            assert p.grad is None or torch.equal(p.grad, grads[k]), k
        assert [m.training for m in module.modules()] == modes
        assert torch.equal(torch.get_rng_state(), rng)
        count = len(self.sgn.session.steps)
        if count > self._count:
            self.measured.append((trainer.global_step, batch_idx))
            assert all(p.grad is not None for p in module.parameters())  # a real check
        self._count = count


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N_TRAIN, 8, generator=gen), torch.randint(0, 3, (N_TRAIN,), generator=gen)


def fit(module, callbacks, *, max_steps: int, accumulate: int = 1, ckpt_path=None,
        **trainer_options) -> pl.Trainer:
    x, y = data()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         max_steps=max_steps, accumulate_grad_batches=accumulate,
                         callbacks=callbacks, **trainer_options)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def callback(out: Path, **options) -> SGNCallback:
    x, y = data()
    return SGNCallback(**{"probe_x": x[:32], "probe_y": y[:32], "out": out, "every": 2,
                          **options})


def reference(weights: dict[str, torch.Tensor]) -> sgn_lab.NoiseStats:
    """The SGN of the probe set at the saved weights, in float32, computed apart."""
    x, y = data()
    model = MLP()
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return sgn_lab.noise_stats(sgn_lab.per_sample_grads(model, F.cross_entropy, x[:32], y[:32]))


def check_numbers(metrics, snapshots: Snapshots) -> None:
    for row in metrics.itertuples():
        want = reference(snapshots.weights[row.step])
        assert row.trace == pytest.approx(want.trace, rel=1e-5)
        assert row.mean_sq_norm == pytest.approx(want.mean_sq_norm, rel=1e-4)
        assert row.noise_scale == pytest.approx(want.noise_scale, rel=1e-3, nan_ok=True)
    assert metrics["noise_scale"].notna().any()


def test_measures_at_every_k_and_at_the_end_with_the_numbers_of_noise_stats(tmp_path):
    pl.seed_everything(3, verbose=False)
    snapshots = Snapshots()
    fit(MLP(), [callback(tmp_path / "run", every=4), snapshots], max_steps=10)

    run = sgn_lab.load_run(tmp_path / "run")
    assert run.complete
    assert run.metrics["step"].tolist() == [0, 4, 8, 10]
    assert run.metrics.columns[:len(IDENTITY)].tolist() == IDENTITY
    first = run.metrics.iloc[0]
    assert (first["run"], first["label"], first["method"], first["seed"]) == (
        "sgd-lr=0.1-s3", "sgd-lr=0.1", "sgd", 3)
    assert (first["task"], first["model"], first["batch_size"]) == ("TensorDataset", "MLP", BATCH)
    assert run.metrics["epoch"].tolist() == pytest.approx([0, 0.5, 1.0, 1.25])
    # the minibatch columns refer to the trainer's batch and training set, not the probe set
    assert first["minibatch_trace"] == pytest.approx(first["trace"] * (1 / BATCH - 1 / N_TRAIN))
    assert set(run.spectra["step"]) == {0, 4, 8, 10}
    assert run.config["training"]["batch_size"] == BATCH
    assert run.config["probe"]["measure_every"] == 4
    check_numbers(run.metrics, snapshots)


def test_accumulation_measures_once_per_optimizer_step_and_leaves_grads_alone(tmp_path):
    pl.seed_everything(0, verbose=False)
    before = Before()
    sgn = callback(tmp_path / "run", instruments=["sgn", "eval"])
    after = After(before, sgn)
    snapshots = Snapshots()
    trainer = fit(MLP(dropout=0.2), [before, sgn, after, snapshots], max_steps=5, accumulate=2)

    assert trainer.global_step == 5
    run = sgn_lab.load_run(tmp_path / "run")
    assert run.metrics["step"].tolist() == [0, 2, 4, 5]
    # 10 micro-batches; measured after the 4th and the 8th (0 at on_train_start, 5 at the end)
    assert after.batch_ends == 10
    assert after.measured == [(2, 3), (4, 7)]
    assert run.metrics["batch_size"].unique().tolist() == [2 * BATCH]
    assert run.config["training"]["accumulate_grad_batches"] == 2


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, accumulate):
    def train(callbacks):
        pl.seed_everything(7, verbose=False)  # seeds torch, numpy and random
        module = MLP(dropout=0.3)  # dropout and the shuffled order draw from torch's RNG
        fit(module, callbacks, max_steps=12, accumulate=accumulate)
        return (module.state_dict(), torch.get_rng_state(), np.random.get_state()[1].copy(),  # noqa: NPY002
                random.getstate())

    plain = train([])
    sgn = callback(tmp_path / "run", every=3, instruments=["sgn", "tails", "eval", Greedy()])
    measured = train([sgn])
    for k, v in plain[0].items():
        assert torch.equal(v, measured[0][k]), k
    assert torch.equal(plain[1], measured[1])
    assert np.array_equal(plain[2], measured[2])
    assert plain[3] == measured[3]
    assert len(sgn_lab.load_run(tmp_path / "run").metrics) == 5  # 0, 3, 6, 9, 12


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed with GradScaler"])
def test_mixed_precision_is_measured_in_float32_without_the_loss_scale(tmp_path, precision):
    """Lightning turns precision='16-mixed' on the CPU into bf16-mixed; the plugin below is a
    real fp16 autocast with a GradScaler (scale 2**16), on the CPU."""
    if precision == "bf16-mixed":
        options = {"precision": "bf16-mixed"}
    else:
        options = {"plugins": [MixedPrecision("16-mixed", "cpu",
                                              scaler=torch.amp.GradScaler("cpu"))]}
    pl.seed_everything(0, verbose=False)
    snapshots = Snapshots()
    module = MLP()
    trainer = fit(module, [callback(tmp_path / "run"), snapshots], max_steps=4, **options)

    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert (scaler is not None and scaler.get_scale() > 1) == (precision != "bf16-mixed")
    assert all(p.dtype == torch.float32 for p in module.parameters())
    metrics = sgn_lab.load_run(tmp_path / "run").metrics
    assert metrics["step"].tolist() == [0, 2, 4]
    check_numbers(metrics, snapshots)


def test_half_precision_weights_are_measured_on_a_float32_copy(tmp_path):
    pl.seed_everything(0, verbose=False)
    snapshots = Snapshots()
    module = MLP()
    fit(module, [callback(tmp_path / "run"), snapshots], max_steps=2, precision="bf16-true")

    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    check_numbers(sgn_lab.load_run(tmp_path / "run").metrics, snapshots)


def test_tensorboard_event_files(tmp_path):
    pl.seed_everything(0, verbose=False)
    fit(MLP(), [callback(tmp_path / "run", log=("tensorboard",), instruments=["sgn"])],
        max_steps=2)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_wandb_run_with_the_metrics_columns(tmp_path, monkeypatch):
    """log=("wandb",): the callback's measurements in an offline W&B run, read back."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from wandb_helpers import history

    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_CONFIG_DIR", str(tmp_path / "cfg")),
                       ("WANDB_CACHE_DIR", str(tmp_path / "cache"))):
        monkeypatch.setenv(key, value)
    pl.seed_everything(0, verbose=False)
    fit(MLP(), [callback(tmp_path / "run", log=("wandb",), instruments=["sgn"])], max_steps=2)
    metrics = sgn_lab.load_run(tmp_path / "run").metrics
    logged = history(tmp_path / "run")
    assert sorted(logged) == list(metrics["step"])
    for _, row in metrics.iterrows():
        assert logged[int(row["step"])]["trace"] == pytest.approx(row["trace"], rel=1e-15)


def test_a_resumed_fit_continues_the_run_and_a_new_one_is_refused(tmp_path):
    pl.seed_everything(0, verbose=False)
    module = MLP()
    trainer = fit(module, [callback(tmp_path / "run", every=3, instruments=["sgn"])],
                  max_steps=4)
    trainer.save_checkpoint(tmp_path / "at4.ckpt")
    with pytest.raises(ValueError, match="already holds the run"):
        fit(MLP(), [callback(tmp_path / "run", instruments=["sgn"])], max_steps=2)

    fit(MLP(), [callback(tmp_path / "run", every=3, instruments=["sgn"])], max_steps=7,
        ckpt_path=tmp_path / "at4.ckpt")
    run = sgn_lab.load_run(tmp_path / "run")
    assert run.complete
    assert run.metrics["step"].tolist() == [0, 3, 4, 6, 7]


def test_the_run_directory_is_locked_during_training(tmp_path):
    attempts = []

    class Intruder(pl.Callback):  # another writer of the same directory, mid-training
        def on_train_batch_end(self, trainer, module, *args):
            with pytest.raises(RunDirError, match="another sgn-lab process"):
                with locked(tmp_path / "run"):
                    pass
            attempts.append(trainer.global_step)

    fit(MLP(), [callback(tmp_path / "run", instruments=["sgn"]), Intruder()], max_steps=2)
    assert attempts == [1, 2]
    assert sgn_lab.load_run(tmp_path / "run").complete
    with locked(tmp_path / "run"):  # released at the end
        pass


def test_a_failed_fit_leaves_the_run_incomplete_and_unlocked(tmp_path):
    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            if trainer.global_step == 3:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit(MLP(), [callback(tmp_path / "run", instruments=["sgn"]), Boom()], max_steps=6)
    run = sgn_lab.load_run(tmp_path / "run")
    assert not run.complete
    assert run.metrics["step"].tolist() == [0, 2]
    with pytest.raises(ValueError, match="already holds the run"):  # not: locked
        fit(MLP(), [callback(tmp_path / "run", instruments=["sgn"])], max_steps=1)


def test_the_loss_comes_from_the_option_or_the_module(tmp_path):
    with pytest.raises(ValueError, match="pass loss_fn=.*NoLoss a loss_fn attribute"):
        fit(NoLoss(), [callback(tmp_path / "a")], max_steps=1)
    assert not (tmp_path / "a").exists()
    fit(NoLoss(), [callback(tmp_path / "b", loss_fn=F.cross_entropy, instruments=["sgn"])],
        max_steps=1)
    assert sgn_lab.load_run(tmp_path / "b").complete


@pytest.mark.parametrize(("options", "message"), [
    ({"every": 0}, "every must be an integer >= 1, got 0"),
    ({"samples": 33}, "samples must be at most the 32 probe samples, got 33"),
    ({"samples": 1}, "samples must be an integer >= 2, got 1"),
    ({"grads": "fast"}, "grads must be one of auto, vmap, gram, got 'fast'"),
    ({"instruments": ["updates"]}, "instrument 'updates' steps copies of an sgn_lab optimizer"),
    ({"instruments": ["noise"]}, "instruments must be one of .*, got 'noise'"),
    ({"instruments": ["sgn", "sgn"]}, "instrument 'sgn' given twice"),
    ({"instruments": ["curvature"], "grads": "gram"}, "grads='gram' cannot serve the curv"),
    ({"log": ("mlflow",)}, "log must be one of tensorboard, wandb, got 'mlflow'"),
    ({"probe_y": torch.zeros(31, dtype=torch.long)}, "probe_x has 32 samples but probe_y "
                                                     "has 31"),
    ({"probe_x": [1.0, 2.0]}, "probe_x must be a tensor with a sample axis, got list"),
    ({"eval_x": torch.zeros(4, 8)}, "give both eval_x and eval_y, or neither"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"name": ""}, "name must be a non-empty string, got ''"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"loss_fn": "mse"}, "loss_fn must be callable, got 'mse'"),
])
def test_bad_options_are_one_line_errors(tmp_path, options, message):
    with pytest.raises(ValueError, match=message) as error:
        callback(tmp_path / "run", **options)
    assert "\n" not in str(error.value)
