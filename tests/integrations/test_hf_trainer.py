"""SGNTrainerCallback in a real transformers.Trainer: a tiny GPT-2 language model, on the CPU.

Nothing reaches the hub: the model is built from a GPT2Config. The recorded numbers are checked
against noise_stats(per_sample_grads(Logits(model), token_cross_entropy, ...)) of the weights a
second callback saved at each step, and training with the callback against training without.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import sgn_lab

transformers = pytest.importorskip("transformers")
from hf_snapshots import Snapshots  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from sgn_lab.integrations.hf import (  # noqa: E402
    SGNTrainerCallback,
    default_loss,
    next_token_pairs,
)
from sgn_lab.models.hf import Logits  # noqa: E402
from sgn_lab.models.losses import token_cross_entropy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

IDENTITY = ["run", "label", "task", "model", "method", "seed", "lr", "batch_size"]
N_TRAIN, T, VOCAB, BATCH = 48, 8, 32, 4


class Windows(torch.utils.data.Dataset):
    """Token windows as the Trainer takes them: the model shifts ``labels`` itself."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Guard(TrainerCallback):
    """Around SGNTrainerCallback (one instance before, one after): what a measurement must
    leave as it was, at every step end and substep end."""

    def __init__(self, before: Guard | None = None) -> None:
        self.before, self.state, self.checked = before, None, 0

    def _look(self, model):
        grads = {k: None if p.grad is None else p.grad.clone()
                 for k, p in model.named_parameters()}
        return grads, [m.training for m in model.modules()], torch.get_rng_state()

    def _hook(self, model) -> None:
        if self.before is None:
            self.state = self._look(model)
            return
        (grads, modes, rng), (now, now_modes, now_rng) = self.before.state, self._look(model)
        assert all((grads[k] is None and now[k] is None) or torch.equal(grads[k], now[k])
                   for k in grads)
        assert modes == now_modes and torch.equal(rng, now_rng)
        self.checked += 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._hook(model)

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._hook(model)


def tokens() -> torch.Tensor:
    """Windows counting up from a random start: a learnable next token."""
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, VOCAB, (N_TRAIN, 1), generator=gen) + torch.arange(T)) % VOCAB


def gpt2(dropout: float = 0.0) -> GPT2LMHeadModel:
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=T,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=0, eos_token_id=0, use_cache=False,
                        attn_implementation="eager")  # sdpa has no vmap rule: slow here
    return GPT2LMHeadModel(config)


def train(model, callbacks, tmp_path: Path, *, max_steps: int, accumulate: int = 1,
          **options) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[], use_cpu=True,
                             max_steps=max_steps, per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=accumulate, learning_rate=1e-2,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             seed=0, **options)
    trainer = Trainer(model=model, args=args, train_dataset=Windows(tokens()),
                      callbacks=callbacks)
    trainer.train()
    return trainer


def callback(out: Path, **options) -> SGNTrainerCallback:
    x, y = next_token_pairs(tokens()[:16])
    return SGNTrainerCallback(**{"probe_x": x, "probe_y": y, "out": out, "every": 2,
                                 **options})


def check_numbers(metrics, snapshots: Snapshots) -> None:
    """The recorded SGN equals the SGN of the saved weights, computed apart in float32."""
    x, y = next_token_pairs(tokens()[:16])
    for row in metrics.itertuples():
        model = gpt2()
        model.load_state_dict({k: v.float() for k, v in snapshots.weights[row.step].items()})
        want = sgn_lab.noise_stats(sgn_lab.per_sample_grads(Logits(model), token_cross_entropy,
                                                            x, y))
        assert row.trace == pytest.approx(want.trace, rel=1e-5)
        assert row.noise_scale == pytest.approx(want.noise_scale, rel=1e-3, nan_ok=True)
    assert metrics["noise_scale"].notna().any()


def test_the_probe_loss_is_the_loss_the_trainer_trains():
    torch.manual_seed(0)
    model = gpt2()
    ids = tokens()[:16]
    x, y = next_token_pairs(ids)
    hf_loss = model(input_ids=ids, labels=ids).loss
    assert float(token_cross_entropy(Logits(model)(x), y)) == pytest.approx(float(hf_loss),
                                                                             rel=1e-6)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_measures_at_every_k_and_at_the_end_with_the_numbers_of_noise_stats(tmp_path,
                                                                            accumulate):
    torch.manual_seed(0)
    before = Guard()
    sgn = callback(tmp_path / "run")
    after = Guard(before)
    snapshots = Snapshots()
    train(gpt2(), [before, sgn, after, snapshots], tmp_path, max_steps=5,
          accumulate=accumulate)

    run = sgn_lab.load_run(tmp_path / "run")
    assert run.complete
    assert run.metrics["step"].tolist() == [0, 2, 4, 5]  # once per optimizer step
    assert after.checked == 5 * accumulate  # step ends and substep ends (micro-batches)
    assert run.metrics.columns[:len(IDENTITY)].tolist() == IDENTITY
    first = run.metrics.iloc[0]
    effective = BATCH * accumulate
    assert (first["run"], first["label"], first["task"], first["model"], first["method"],
            first["seed"], first["lr"], first["batch_size"]) == (
        "adamw-lr=0.01-s0", "adamw-lr=0.01", "Windows", "GPT2LMHeadModel", "adamw", 0, 0.01,
        effective)
    assert first["minibatch_trace"] == pytest.approx(first["trace"]
                                                     * (1 / effective - 1 / N_TRAIN))
    assert run.metrics["epoch"].tolist() == pytest.approx(
        [s * effective / N_TRAIN for s in (0, 2, 4, 5)])
    assert set(run.spectra["step"]) == {0, 2, 4, 5}
    assert run.config["training"]["gradient_accumulation_steps"] == accumulate
    check_numbers(run.metrics, snapshots)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, accumulate):
    def weights_and_rng(callbacks):
        torch.manual_seed(0)
        model = gpt2(dropout=0.1)  # dropout and the shuffled order draw from torch's RNG
        train(model, callbacks, tmp_path, max_steps=6, accumulate=accumulate)
        return (model.state_dict(), torch.get_rng_state(), np.random.get_state()[1].copy(),  # noqa: NPY002
                random.getstate())

    plain = weights_and_rng([])
    measured = weights_and_rng([callback(tmp_path / "run", instruments=["sgn", "tails",
                                                                         "eval"])])
    for k, v in plain[0].items():
        assert torch.equal(v, measured[0][k]), k
    assert torch.equal(plain[1], measured[1])
    assert np.array_equal(plain[2], measured[2])
    assert plain[3] == measured[3]
    assert sgn_lab.load_run(tmp_path / "run").metrics["step"].tolist() == [0, 2, 4, 6]


class SeenMode:
    """An instrument of one's own: the train/eval flag of the model the probe measures."""

    name, needs_grads = "seen_mode", False

    def __init__(self) -> None:
        self.training: list[bool] = []

    def __call__(self, measurement) -> dict[str, float]:
        self.training.append(measurement.probe.model.training)
        return {}


def test_the_model_is_measured_in_train_mode_and_put_back(tmp_path):
    torch.manual_seed(0)
    model = gpt2(dropout=0.1).eval()  # the Trainer calls model.train() in training_step only
    seen, at_begin = SeenMode(), []

    class ModeAtBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            at_begin.append(model.training)

    train(model, [callback(tmp_path / "run", instruments=["sgn", seen]), ModeAtBegin()],
          tmp_path, max_steps=1)
    assert seen.training == [True, True]  # steps 0 and 1
    assert at_begin == [False]


def test_bf16_autocast_is_measured_in_float32(tmp_path):
    """accelerate wraps model.forward in autocast: the probe must call the original."""
    torch.manual_seed(0)
    snapshots = Snapshots()
    model = gpt2()
    wrapped = []

    class Forward(TrainerCallback):  # after SGNTrainerCallback: the wrapper is back in place
        def on_step_end(self, args, state, control, model=None, **kwargs):
            forward, original = model.__dict__["forward"], model.__dict__["_original_forward"]
            wrapped.append(forward is not original)

    train(model, [callback(tmp_path / "run"), snapshots, Forward()], tmp_path, max_steps=2,
          bf16=True)
    assert wrapped == [True, True]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    run = sgn_lab.load_run(tmp_path / "run")
    assert run.config["training"]["precision"] == "bf16"
    check_numbers(run.metrics, snapshots)


def test_tensorboard_event_files(tmp_path):
    torch.manual_seed(0)
    train(gpt2(), [callback(tmp_path / "run", log=("tensorboard",), instruments=["sgn"])],
          tmp_path, max_steps=1)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_directory_with_a_run_is_refused_and_close_releases_it(tmp_path):
    torch.manual_seed(0)
    train(gpt2(), [callback(tmp_path / "run", instruments=["sgn"])], tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="already holds the run 'adamw-lr=0.01-s0'"):
        train(gpt2(), [callback(tmp_path / "run", instruments=["sgn"])], tmp_path, max_steps=1)

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    sgn = callback(tmp_path / "other", instruments=["sgn"])
    with pytest.raises(RuntimeError, match="boom"):
        train(gpt2(), [sgn, Boom()], tmp_path, max_steps=2)
    sgn.close()  # the Trainer has no hook for a failed training
    run = sgn_lab.load_run(tmp_path / "other")
    assert not run.complete and run.metrics["step"].tolist() == [0]
    from sgn_lab.run.rundir import locked

    with locked(tmp_path / "other"):
        pass


def test_default_loss_follows_the_targets():
    assert default_loss(torch.zeros(4, 7, dtype=torch.long)) is token_cross_entropy
    assert default_loss(torch.zeros(4, dtype=torch.long)) is torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match="no default loss for probe_y of dtype torch.float32 "
                                         "and shape \\(4,\\): pass loss_fn"):
        SGNTrainerCallback(probe_x=torch.zeros(4, 3), probe_y=torch.zeros(4), out="unused")


@pytest.mark.parametrize(("options", "message"), [
    ({"every": 0}, "every must be an integer >= 1, got 0"),
    ({"instruments": ["updates"]}, "instrument 'updates' steps copies of an sgn_lab optimizer"),
    ({"input_name": ""}, "input_name must be a non-empty string, got ''"),
    ({"log": ("mlflow",)}, "log must be one of tensorboard, wandb, got 'mlflow'"),
    ({"probe_y": torch.zeros(3, T - 1, dtype=torch.long)}, "probe_x has 16 samples but "
                                                            "probe_y has 3"),
])
def test_bad_options_are_one_line_errors(tmp_path, options, message):
    with pytest.raises(ValueError, match=message) as error:
        callback(tmp_path / "run", **options)
    assert "\n" not in str(error.value)


def test_next_token_pairs_needs_windows():
    with pytest.raises(ValueError, match="input_ids must be \\(n, T\\) token windows with "
                                         "T >= 2, got \\(4,\\)"):
        next_token_pairs(torch.zeros(4, dtype=torch.long))
