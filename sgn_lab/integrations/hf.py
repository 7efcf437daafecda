"""SGNTrainerCallback: the SGN probe inside a Hugging Face ``transformers.Trainer`` (extra ``hf``).

What is measured
    The per-sample gradients of ``loss_fn(model(x), y)`` over a fixed probe set (``probe_x``,
    ``probe_y``) and the instruments' statistics of them (default: ``sgn`` and ``tails``, plus
    ``eval`` on the probe set and ``eval_x``/``eval_y`` when an evaluation set is given). A
    model with a Hugging Face ``config`` (a ``PreTrainedModel``, or a wrapper of one) is
    measured through :class:`sgn_lab.models.hf.Logits`, so ``model(x)`` is
    ``model(**{input_name: x}).logits``; any other module as it is. The model is measured in
    train mode, as the Trainer trains it (its ``training_step`` calls ``model.train()``), and
    put back in its mode afterwards.

The loss
    ``loss_fn`` when given, else a cross entropy chosen from ``probe_y``: integer targets
    (n, T) give :func:`sgn_lab.models.losses.token_cross_entropy` of the logits (n, T, V),
    integer targets (n,) the cross entropy of class logits (n, C); anything else needs
    ``loss_fn``. For a causal LM trained on ``labels = input_ids`` (the model shifts them),
    :func:`next_token_pairs` gives the probe set whose per-sample losses are the Trainer's:
    ``probe_x = ids[:, :-1]``, ``probe_y = ids[:, 1:]`` (the attention is causal, so the logits
    of the shorter window are the same).

    Averages: each probe sample's loss is ``loss_fn`` on that sample alone; with
    :func:`~sgn_lab.models.losses.token_cross_entropy` it is the mean over the sample's real
    targets (those not ``IGNORE_INDEX``), and the probe's mean gradient and ``train_loss`` are
    means over samples. The Trainer's own loss of a causal LM is the mean over all real tokens
    of its batch (with ``num_items_in_batch``, of all its micro-batches): for windows of one
    length the two agree; for padded examples of different lengths the Trainer weights each
    example by its length and the probe does not. ``config.json`` states the probe's average
    as ``probe.loss_average``.

Padded examples
    Examples of different lengths enter the probe as one tensor: ``probe_x`` int64 (n, T) with
    :data:`sgn_lab.data.PAD_ID` (-1) at the padding, ``probe_y`` next tokens (n, T) with
    ``IGNORE_INDEX`` (-100) at the padding and at each last real position
    (:func:`padded_next_token_pairs` makes them from a Trainer batch's ``input_ids`` and
    ``attention_mask``; :func:`sgn_lab.data.padded_batch` from token lists). With
    ``padded=True`` (the default when ``probe_x`` holds a negative id) a Hugging Face model is
    called with ``input_ids = x.clamp(min=0)`` and ``attention_mask = (x >= 0)``
    (:class:`~sgn_lab.models.hf.Logits`).

When
    At ``on_train_begin`` (step 0, or the step a checkpoint resumes from), at ``on_step_end``
    when ``state.global_step`` (optimizer steps: once per ``gradient_accumulation_steps``
    micro-batches) reaches a multiple of ``every``, and at ``on_train_end``. Only the main
    process (``state.is_world_process_zero``) measures.

The run directory ``out``
    The files of ``sgn-lab measure`` (:func:`sgn_lab.load_run` reads them), locked from
    ``on_train_begin`` to ``on_train_end``, ``complete: true`` in ``config.json`` at the end.
    Identity columns: run, label (the optimizer's class name lowercased and
    ``args.learning_rate``: ``adamw-lr=0.001``), task (the training dataset's class name, or
    ``task``), model (the model's class name), method, seed (``seed``, else ``args.seed``), lr
    and batch_size: ``per_device_train_batch_size × gradient_accumulation_steps ×
    world_size``. A directory that holds a run already is an error, except for a training
    resumed from a checkpoint into the run of the same name. The Trainer has no hook for a
    failed training: the lock is then released by :meth:`SGNTrainerCallback.close`, by the
    next ``train()``, or when the process ends, and the run stays incomplete.

Training is left as it would be without the callback: the random state (torch CPU and CUDA,
Python, numpy), the ``.grad`` buffers, the train/eval flags and the weights are as before each
measurement (:mod:`sgn_lab.integrations.session`), so a seeded run gives bit-identical
weights with or without it.

Mixed precision
    With ``bf16=True`` or ``fp16=True`` (fp16 with a GradScaler, on the GPU) the weights stay
    float32, and accelerate replaces ``model.forward`` by a wrapper that enters autocast at
    every call. The probe calls the model's own forward (``model._original_forward``; the
    wrapper is put back after each measurement) with autocast disabled, differentiates its own
    float32 loss and never reads ``.grad``: it measures the float32 noise at the float32
    weights, and the loss scale never enters. A model loaded in float16 or bfloat16 is measured
    on a float32 copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PretrainedConfig, TrainerCallback

from sgn_lab.data import PAD_ID
from sgn_lab.integrations.session import (
    ProbeSettings,
    Session,
    TrainingFacts,
    dataset_size,
    optimizer_name,
)
from sgn_lab.models.hf import Logits
from sgn_lab.models.losses import IGNORE_INDEX, token_cross_entropy
from sgn_lab.run.instruments import Instrument
from sgn_lab.run.probe import LossFn

__all__ = ["SGNTrainerCallback", "default_loss", "next_token_pairs", "padded_next_token_pairs"]


def next_token_pairs(input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The probe set of a causal LM trained on ``labels = input_ids``: each window without its
    last token, and the next token at every position."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else input_ids
        raise ValueError(f"input_ids must be (n, T) token windows with T >= 2, got {shape!r}")
    return input_ids[:, :-1], input_ids[:, 1:]


def padded_next_token_pairs(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The probe set of a causal LM trained on padded batches (``labels = input_ids`` with the
    padding ignored): x = ``input_ids`` with :data:`sgn_lab.data.PAD_ID` (-1) where
    ``attention_mask`` is 0, and y (n, T) with y_t = input_ids_{t+1} where positions t and
    t+1 are both real, ``IGNORE_INDEX`` (-100) elsewhere (the last real position, the
    padding). Either padding side; their average is per sample (module docstring). With
    right padding the per-token losses are the Trainer's; with left padding the Trainer's
    shifted labels also score the last padding position's prediction of the first real
    token, which has no target here (a padding position predicts nothing)."""
    if (not isinstance(input_ids, Tensor) or not isinstance(attention_mask, Tensor)
            or input_ids.dim() != 2 or attention_mask.shape != input_ids.shape):
        raise ValueError("input_ids and attention_mask must be (n, T) tensors of one shape")
    real = attention_mask.bool()
    x = torch.where(real, input_ids, torch.full_like(input_ids, PAD_ID))
    y = torch.full_like(input_ids, IGNORE_INDEX)
    both = real[:, :-1] & real[:, 1:]
    y[:, :-1] = torch.where(both, input_ids[:, 1:], y[:, :-1])
    return x, y


def default_loss(probe_y: Tensor) -> LossFn:
    """The cross entropy that fits the targets: token targets (n, T) or class targets (n,)."""
    if not probe_y.is_floating_point() and probe_y.dim() == 2:
        return token_cross_entropy
    if not probe_y.is_floating_point() and probe_y.dim() == 1:
        return F.cross_entropy
    raise ValueError(f"no default loss for probe_y of dtype {probe_y.dtype} and shape "
                     f"{tuple(probe_y.shape)}: pass loss_fn")


class SGNTrainerCallback(TrainerCallback):
    """Measure the SGN of a Trainer's model every ``every`` optimizer steps into ``out``.

    Parameters
    ----------
    probe_x, probe_y
        The fixed probe set: model inputs (``input_ids`` (n, T), or ``pixel_values``...) and
        the targets ``loss_fn`` takes.
    out
        The run directory.
    loss_fn
        Mean-reduced loss ``loss_fn(logits, targets)``; default: :func:`default_loss`.
    every
        Measure every k optimizer steps (``state.global_step``).
    instruments
        Instrument names or objects: ``sgn``, ``tails``, ``eval``, ``curvature`` (not
        ``updates``). Default: sgn and tails, and eval when ``eval_x`` is given.
    eval_x, eval_y
        Optional evaluation set of the eval instrument (``test_loss``, ``test_accuracy``).
    samples
        Per-sample gradients per measurement: a fixed seeded subset of the probe set
        (default: all of it).
    grads, chunk_size
        The probe's per-sample gradient path (``auto``, ``vmap``, ``gram``) and chunking, as
        in :class:`sgn_lab.NoiseProbe`.
    seed
        Seed of the probe's own draws and the ``seed`` column (default: ``args.seed``).
    name, task
        The run's name (default: label and seed) and task column (default: the training
        dataset's class name).
    input_name
        The keyword a Hugging Face model takes ``probe_x`` as (``pixel_values`` for ViT).
    padded
        ``probe_x`` holds token ids padded with ``PAD_ID`` (-1): a Hugging Face model is called
        with the attention mask ``x >= 0`` (module docstring). Default: True when ``probe_x``
        is an integer tensor holding a negative id.
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
        input_name: str = "input_ids",
        padded: bool | None = None,
        log: Sequence[str] = (),
    ) -> None:
        self.settings = ProbeSettings.checked(
            probe_x=probe_x, probe_y=probe_y, out=out, every=every, instruments=instruments,
            eval_x=eval_x, eval_y=eval_y, samples=samples, grads=grads, chunk_size=chunk_size,
            seed=seed, name=name, task=task, log=log)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
        if not isinstance(input_name, str) or not input_name:
            raise ValueError(f"input_name must be a non-empty string, got {input_name!r}")
        self.loss_fn = loss_fn if loss_fn is not None else default_loss(probe_y)
        self.input_name = input_name
        if padded is None:
            padded = (not probe_x.is_floating_point() and probe_x.numel() > 0
                      and bool((probe_x < 0).any()))
        elif not isinstance(padded, bool):
            raise ValueError(f"padded must be true or false, got {padded!r}")
        if padded and input_name != "input_ids":
            raise ValueError(f"padded probe_x holds token ids (input_ids), not {input_name}")
        self.padded = padded
        self.session: Session | None = None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.close()  # a previous train() that raised
        if model is None:
            raise ValueError("SGNTrainerCallback needs the Trainer's model")
        hugging_face = isinstance(getattr(model, "config", None), PretrainedConfig)
        probed = (Logits(model, self.input_name, padded=self.padded) if hugging_face
                  else model)
        step = state.global_step
        self.session = Session(self.settings, probed, self.loss_fn, start=step,
                               facts=self._facts(args, model, kwargs), train_mode=True)
        self.session.start(step, float(state.epoch or 0.0))

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if self.session is not None:  # called once per optimizer step
            self.session.step(state.global_step, _epoch(state))

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.finish(state.global_step, _epoch(state))

    def close(self) -> None:
        """Release the run directory of an unfinished training (it stays incomplete)."""
        if self.session is not None:
            session, self.session = self.session, None
            session.close()

    def _facts(self, args, model: nn.Module, hooks: dict[str, Any]) -> TrainingFacts:
        loader = hooks.get("train_dataloader")
        dataset = getattr(loader, "dataset", None)
        per_device, accumulate = args.per_device_train_batch_size, args.gradient_accumulation_steps
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "32"
        return TrainingFacts(
            trainer="transformers",
            task=self.settings.task or (type(dataset).__name__ if dataset is not None
                                        else "custom"),
            model=type(model).__name__, method=optimizer_name(hooks.get("optimizer")),
            lr=float(args.learning_rate),
            seed=self.settings.seed if self.settings.seed is not None else int(args.seed),
            batch_size=per_device * accumulate * args.world_size,
            dataset_size=None if dataset is None else dataset_size(dataset),
            training={"per_device_train_batch_size": per_device,
                      "gradient_accumulation_steps": accumulate,
                      "world_size": args.world_size, "precision": precision,
                      "max_steps": args.max_steps, "num_train_epochs": args.num_train_epochs,
                      "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value",
                                                           args.lr_scheduler_type))})


def _epoch(state) -> float:
    return math.nan if state.epoch is None else float(state.epoch)
