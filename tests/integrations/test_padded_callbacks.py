"""The trainer callbacks on padded examples of different lengths: a Lightning module and a
Hugging Face Trainer, each training a tiny GPT-2 on a jsonl task, on the CPU.

The recorded SGN is checked against noise_stats(per_sample_grads(Logits(model, padded=True),
token_cross_entropy, ...)) at the weights a second callback saved, and the recorded losses
against the mean over samples of each sample's mean over its real tokens, computed apart.
"""

from __future__ import annotations

import pytest
import torch
from padded_helpers import mixed_records, tiny_gpt2, write_jsonl
from torch.utils.data import DataLoader, TensorDataset

import sgn_lab
from sgn_lab.data import (
    IGNORE_INDEX,
    LOSS_AVERAGE,
    DataWarning,
    attention_mask,
    load_jsonl,
    padded_batch,
)
from sgn_lab.models.losses import token_cross_entropy

transformers = pytest.importorskip("transformers")
from hf_snapshots import Snapshots as HFSnapshots  # noqa: E402

from sgn_lab.integrations.hf import SGNTrainerCallback, padded_next_token_pairs  # noqa: E402
from sgn_lab.models.hf import Logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROBE = 8


def task(tmp_path, padding: str = "right"):
    """24 texts of 3 to about 25 characters, char tokens, padded (3 cut to 16 tokens)."""
    path = write_jsonl(tmp_path / "lm.jsonl", mixed_records(24))
    with pytest.warns(DataWarning, match="3 example"):
        return load_jsonl(path, tokens="char", padding=padding, context=16)


def reference(model, x, y):
    """The SGN and the loss of the probe set at the model's weights, computed apart."""
    wrapped = Logits(model, padded=True)
    stats = sgn_lab.noise_stats(sgn_lab.per_sample_grads(wrapped, token_cross_entropy, x, y))
    with torch.no_grad():
        logits = wrapped.eval()(x)
        losses = []
        for i in range(len(x)):  # the per-sample loss: the mean over its real targets
            real = y[i] != IGNORE_INDEX
            losses.append(torch.nn.functional.cross_entropy(logits[i][real], y[i][real]))
    return stats, float(torch.stack(losses).mean())


# ------------------------------------------------------------------------------------------
# Lightning
# ------------------------------------------------------------------------------------------

pl = pytest.importorskip("lightning.pytorch")
from lightning_snapshots import Snapshots  # noqa: E402

from sgn_lab.integrations.lightning import SGNCallback  # noqa: E402


class PaddedLM(pl.LightningModule):
    """A GPT-2 over padded ids (PAD_ID = -1), trained on the per-sample-mean token loss."""

    def __init__(self, vocab: int, positions: int) -> None:
        super().__init__()
        self.net = Logits(tiny_gpt2(vocab, positions), padded=True)
        self.loss_fn = token_cross_entropy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_lightning_callback_measures_padded_examples(tmp_path, padding):
    data = task(tmp_path, padding)
    x, y = data.x_train, data.y_train
    pl.seed_everything(0, verbose=False)
    module = PaddedLM(data.num_classes, x.shape[1])
    snapshots = Snapshots()
    sgn = SGNCallback(probe_x=x[:PROBE], probe_y=y[:PROBE], out=tmp_path / "run", every=2,
                      instruments=["sgn", "eval"], eval_x=data.x_test, eval_y=data.y_test)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, max_steps=3,
                         callbacks=[sgn, snapshots])
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True))

    run = sgn_lab.load_run(tmp_path / "run")
    assert run.metrics["step"].tolist() == [0, 2, 3]
    assert run.config["probe"]["loss_average"] == LOSS_AVERAGE
    for row in run.metrics.itertuples():
        model = PaddedLM(data.num_classes, x.shape[1])
        model.load_state_dict(snapshots.weights[row.step])
        stats, loss = reference(model.net.model, x[:PROBE], y[:PROBE])
        assert row.trace == pytest.approx(stats.trace, rel=1e-4)
        assert row.mean_sq_norm == pytest.approx(stats.mean_sq_norm, rel=1e-4)
        assert row.train_loss == pytest.approx(loss, rel=1e-5)  # the per-sample mean


# ------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ------------------------------------------------------------------------------------------

class Examples(torch.utils.data.Dataset):
    """Padded examples as the Trainer takes them: ids, mask, labels with the padding -100
    (the model shifts the labels itself)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = attention_mask(self.x[i])
        ids = self.x[i].clamp(min=0)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.where(mask.bool(), ids, IGNORE_INDEX)}


def test_padded_next_token_pairs_are_the_padded_batch():
    seqs = [[5, 6], [1, 2, 3, 4], [7, 8, 9]]
    for side in ("right", "left"):
        x, y = padded_batch(seqs, padding=side)
        got = padded_next_token_pairs(x.clamp(min=0), attention_mask(x))
        assert torch.equal(got[0], x) and torch.equal(got[1], y)


def test_hf_trainer_callback_measures_padded_examples(tmp_path):
    # right padding: with left padding HF's shifted labels also score the last padding
    # position's prediction of the first real token, which the per-sample targets leave out
    data = task(tmp_path, "right")
    x = data.x_train
    x_probe, y_probe = padded_next_token_pairs(x[:PROBE].clamp(min=0), attention_mask(x[:PROBE]))
    assert torch.equal(y_probe, data.y_train[:PROBE])
    torch.manual_seed(0)
    model = tiny_gpt2(data.num_classes, x.shape[1])
    # the per-token losses are the Trainer's: one example alone gives HF's own loss
    with torch.no_grad():
        item = Examples(x[:1])[0]
        hf = model(**{k: v[None] for k, v in item.items()}).loss
        ours = token_cross_entropy(Logits(model, padded=True)(x_probe[:1]), y_probe[:1])
    assert float(ours) == pytest.approx(float(hf), rel=1e-5)

    sgn = SGNTrainerCallback(probe_x=x_probe, probe_y=y_probe, out=tmp_path / "run", every=2,
                             instruments=["sgn", "eval"], eval_x=data.x_test,
                             eval_y=data.y_test)
    assert sgn.padded  # probe_x holds PAD_ID
    snapshots = HFSnapshots()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), report_to=[], use_cpu=True, max_steps=3,
        per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=Examples(x),
                         callbacks=[sgn, snapshots]).train()

    run = sgn_lab.load_run(tmp_path / "run")
    assert run.metrics["step"].tolist() == [0, 2, 3]
    assert run.config["probe"]["loss_average"] == LOSS_AVERAGE
    for row in run.metrics.itertuples():
        saved = tiny_gpt2(data.num_classes, x.shape[1])
        saved.load_state_dict(snapshots.weights[row.step])
        saved.train()
        stats, loss = reference(saved, x_probe, y_probe)
        assert row.trace == pytest.approx(stats.trace, rel=1e-4)
        assert row.train_loss == pytest.approx(loss, rel=1e-5)
