"""SGNCallback: the SGN probe inside a PyTorch Lightning ``Trainer`` (extra ``lightning``).

What is measured
    The per-sample gradients of ``loss_fn(pl_module(x), y)`` over a fixed probe set
    (``probe_x``, ``probe_y``), and the instruments' statistics of them (default: ``sgn`` and
    ``tails``, plus ``eval`` on the probe set and ``eval_x``/``eval_y`` when an evaluation set
    is given). The LightningModule is measured in the train/eval mode it is in (Lightning
    leaves the mode to the module); in train mode its dropout masks come from the probe's own
    seeded generators.

When
    At ``on_train_start`` (step 0, before the first optimizer step), in
    ``on_train_batch_end`` after the optimizer step that makes ``trainer.global_step`` a
    multiple of ``every`` (once per optimizer step, however many micro-batches
    ``accumulate_grad_batches`` gathers into it; with several optimizer steps per batch, at
    the first count past each multiple), and at
    ``on_train_end``. Only global rank 0 measures.

The loss
    ``loss_fn`` when given, else the LightningModule's ``loss_fn`` attribute: a mean-reduced
    loss of (outputs, targets). Neither is an error when ``fit`` starts. Each probe sample's
    loss is ``loss_fn`` on that sample alone, and the measured mean gradient is the mean of the
    per-sample gradients, so the probe's average is over samples whatever ``loss_fn`` does
    within a sample. With :func:`sgn_lab.models.losses.token_cross_entropy` a sequence's loss
    is the mean over its real targets (not ``IGNORE_INDEX``) and a batch's the mean over
    samples: for padded examples of different lengths that is not the mean over all tokens of
    the batch, which a module's own ``training_step`` may use (Hugging Face's ``labels``
    loss does). ``config.json`` states the probe's average as ``probe.loss_average``.

Padded examples
    ``probe_x`` is passed to the module as it is: padded token ids hold
    :data:`sgn_lab.data.PAD_ID` (-1), so its forward must mask them, e.g. through
    :class:`sgn_lab.models.hf.Logits` with ``padded=True`` (attention mask ``x >= 0``).

The run directory ``out``
    The files of ``sgn-lab measure`` (:func:`sgn_lab.load_run` reads them), locked from
    ``on_train_start`` to ``on_train_end``; ``config.json`` has ``complete: true`` once
    training ended, and an exception leaves it false. Identity columns: run, label (the
    optimizer's class name lowercased, and its learning rate: ``sgd-lr=0.1``), task (the
    datamodule's or the training dataset's class name, or ``task``), model (the
    LightningModule's class name), method, seed (``seed``, else the one ``seed_everything``
    set, else 0), lr and batch_size: the effective batch, the train dataloader's batch size
    (or ``batch_size``) × ``accumulate_grad_batches`` × world size. A directory that holds a
    run already is an error, except when ``fit`` resumes from a checkpoint (``ckpt_path``)
    into the run of the same name: rows after the checkpoint's step are then replaced.

Training is left as it would be without the callback: the random state (torch CPU and CUDA,
Python, numpy), the ``.grad`` buffers, the train/eval flags and the weights are as before
each measurement (:mod:`sgn_lab.integrations.session`), so a seeded run gives bit-identical
weights with or without it.

Mixed precision
    With ``precision="16-mixed"`` or ``"bf16-mixed"`` the weights stay float32 and only the
    forward of ``training_step`` runs under autocast; the GradScaler of ``16-mixed`` scales the
    loss whose ``.grad`` the optimizer sees. The probe runs outside that autocast (disabled
    explicitly), differentiates its own float32 loss and never reads ``.grad``: it measures
    the float32 noise at the float32 weights, unscaled. With ``"bf16-true"`` or ``"16-true"``
    it measures a float32 copy of the half-precision weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from sgn_lab import checks
from sgn_lab.integrations.session import (
    ProbeSettings,
    Session,
    TrainingFacts,
    dataset_size,
    optimizer_name,
)
from sgn_lab.run.instruments import Instrument
from sgn_lab.run.probe import LossFn

__all__ = ["SGNCallback"]


class SGNCallback(pl.Callback):
    """Measure the SGN of a LightningModule every ``every`` optimizer steps into ``out``.

    Parameters
    ----------
    probe_x, probe_y
        The fixed probe set: inputs the module's forward takes and targets ``loss_fn`` takes.
    out
        The run directory.
    loss_fn
        Mean-reduced loss ``loss_fn(outputs, targets)``; default: ``pl_module.loss_fn``.
    every
        Measure every k optimizer steps (``trainer.global_step``).
    instruments
        Instrument names or objects (:mod:`sgn_lab.run.instruments`): ``sgn``, ``tails``,
        ``eval``, ``curvature`` (not ``updates``). Default: sgn and tails, and eval when
        ``eval_x`` is given (``train_loss`` is then the loss on the probe set).
    eval_x, eval_y
        Optional evaluation set of the eval instrument (``test_loss``, ``test_accuracy``).
    samples
        Per-sample gradients per measurement: a fixed seeded subset of the probe set
        (default: all of it).
    grads, chunk_size
        The probe's per-sample gradient path (``auto``, ``vmap``, ``gram``) and chunking, as
        in :class:`sgn_lab.NoiseProbe`.
    seed
        Seed of the probe's own draws and the ``seed`` column (default: ``seed_everything``'s
        seed, else 0).
    name, task
        The run's name (default: label and seed) and task column (default: the datamodule's
        or training dataset's class name).
    batch_size
        Per-step batch size when the train dataloader does not tell (default: its own).
    log
        ``("tensorboard",)``: also write TensorBoard event files in ``out/tensorboard``.
    """

    def __init__(
        self,
        *,
        probe_x: Tensor,
        probe_y: Tensor,
        out: str | Path,
        loss_fn: LossFn | None = None,
        every: int = 100,
        instruments: Sequence[str | Instrument] | None = None,
        eval_x: Tensor | None = None,
        eval_y: Tensor | None = None,
        samples: int | None = None,
        grads: str = "auto",
        chunk_size: int | None = None,
        seed: int | None = None,
        name: str | None = None,
        task: str | None = None,
        batch_size: int | None = None,
        log: Sequence[str] = (),
    ) -> None:
        self.settings = ProbeSettings.checked(
            probe_x=probe_x, probe_y=probe_y, out=out, every=every, instruments=instruments,
            eval_x=eval_x, eval_y=eval_y, samples=samples, grads=grads, chunk_size=chunk_size,
            seed=seed, name=name, task=task, log=log)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
        if batch_size is not None:
            checks.integer("batch_size", batch_size, 1)
        self.loss_fn, self.batch_size = loss_fn, batch_size
        self.session: Session | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._loss(pl_module)  # a missing loss stops fit before any training

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        self.close()  # a previous fit that raised
        step = trainer.global_step
        self.session = Session(self.settings, pl_module, self._loss(pl_module), start=step,
                               facts=self._facts(trainer, pl_module))
        self.session.start(step, _epoch(trainer, step))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.session is not None:  # global_step moves only when the optimizer stepped
            self.session.step(trainer.global_step, _epoch(trainer, trainer.global_step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.finish(trainer.global_step, _epoch(trainer, trainer.global_step))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Release the run directory of an unfinished fit (it stays incomplete)."""
        if self.session is not None:
            session, self.session = self.session, None
            session.close()

    def _loss(self, pl_module: pl.LightningModule) -> LossFn:
        loss_fn = self.loss_fn or getattr(pl_module, "loss_fn", None)
        if not callable(loss_fn):
            raise ValueError(f"SGNCallback needs a loss: pass loss_fn=..., or give "
                             f"{type(pl_module).__name__} a loss_fn attribute")
        return loss_fn

    def _facts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TrainingFacts:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        per_step = self.batch_size or getattr(loader, "batch_size", None)
        accumulate = trainer.accumulate_grad_batches
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        group = optimizer.param_groups[0] if optimizer is not None else {}
        datamodule = getattr(trainer, "datamodule", None)
        source = datamodule if datamodule is not None else dataset
        task = self.settings.task or (type(source).__name__ if source is not None else "custom")
        seed = self.settings.seed
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return TrainingFacts(
            trainer="lightning", task=task, model=type(pl_module).__name__,
            method=optimizer_name(optimizer),
            lr=float(group.get("initial_lr", group.get("lr", math.nan))), seed=seed,
            batch_size=None if per_step is None else per_step * accumulate * trainer.world_size,
            dataset_size=None if dataset is None else dataset_size(dataset),
            training={"per_step_batch_size": per_step, "accumulate_grad_batches": accumulate,
                      "world_size": trainer.world_size, "precision": str(trainer.precision),
                      "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs})


def _epoch(trainer: pl.Trainer, step: int) -> float:
    """Optimizer steps as a fraction of an epoch's optimizer steps."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches <= 0:
        return math.nan
    return step / math.ceil(batches / trainer.accumulate_grad_batches)
