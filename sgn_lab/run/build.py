"""The task and the model of a run, from its config: built-in, Hugging Face, or the user's.

``task.name``
    a built-in task string (``mnist1d``, ``markov``, ``linreg:dim=50``, ``npz:PATH``,
    ``text:PATH``, ``jsonl:PATH``, ``hfdata:DIR``, ...; :func:`sgn_lab.data.load_task`) or
    ``pkg.module:callable`` (:mod:`sgn_lab.user`); ``task.options`` are its keyword options,
    and ``task.validation_fraction`` of its training samples become its validation set.
``model.name``
    a built-in model (:data:`sgn_lab.models.MODELS`), a transformer built from a Hugging Face
    config (``gpt2``, ``bert``, ``vit``), ``hf:PATH`` (a model saved in a local folder), or
    ``pkg.module:callable``; ``model.options`` are its keyword options. For a padded task
    (``jsonl:``, ``hfdata:``; ``task.info["padded"]``) the Hugging Face models are wrapped to
    pass the attention mask ``x >= 0`` (:class:`sgn_lab.models.hf.Logits`); a model of one's
    own receives x with ``PAD_ID`` (-1) at the padding and must mask it itself.

:func:`check_fits` then runs the model on two training samples and the task's loss on its
output, so that a model that does not fit the task stops the run at once with one line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sgn_lab.data import Task, hold_out_validation, load_task
from sgn_lab.models import build_model
from sgn_lab.models.hf import build_transformer, is_padded, load_pretrained
from sgn_lab.models.modes import restored_modes
from sgn_lab.run.choices import HF_PREFIX, model_kind
from sgn_lab.seeds import Purpose, seed_for
from sgn_lab.user import first_line, user_model

if TYPE_CHECKING:
    from sgn_lab.run.config import RunConfig


def build_task(config: RunConfig) -> Task:
    """The run's task, seeded with its training seed: loaded (and subsampled to ``n_train``),
    then ``validation_fraction`` of its training samples held out as its validation set
    (:func:`~sgn_lab.data.hold_out_validation`, seeded by ``Purpose.VALIDATION``).

    The one place a run's data are made: training, the probe set (drawn from the training
    samples that remain) and the eval instrument all take this task.
    """
    spec, seed = config.task, config.training.seed
    task = load_task(spec.name, seed=seed, n_train=spec.n_train, **spec.options)
    return hold_out_validation(task, spec.validation_fraction,
                               seed=seed_for(seed, 0, Purpose.VALIDATION))


def build_run_model(config: RunConfig, task: Task) -> nn.Module:
    """The run's model for ``task``, on the CPU, checked to fit it (:func:`check_fits`)."""
    spec = config.model
    kind = model_kind(spec.name)
    if kind == "builtin":
        if task.is_sequence:
            raise ValueError(f"model {spec.name!r} takes one target per sample; task "
                             f"{task.name!r} has token sequences: use gpt2 or bert")
        if is_padded(task):  # -1 would enter as a number: padding needs a mask
            raise ValueError(f"model {spec.name!r} takes features; task {task.name!r} has "
                             "padded token ids: use bert or your own pkg.module:callable")
        _check_options(build_model, spec.name, spec.options, given=("width", "depth"))
        model = build_model(spec.name, task.input_shape, task.num_classes or 1,
                            width=spec.width, depth=spec.depth, **spec.options)
    elif kind == "transformer":
        _check_options(build_transformer, spec.name, spec.options,
                       given=("width", "depth", "heads", "context"))
        model = build_transformer(spec.name, task, width=spec.width, depth=spec.depth,
                                  heads=spec.heads, context=spec.context, **spec.options)
    elif kind == "pretrained":
        if spec.options:  # the saved config is the model: nothing to set
            raise ValueError(f"model {spec.name!r} is loaded as saved; it takes no options, "
                             f"got {', '.join(sorted(spec.options))}")
        model = load_pretrained(spec.name[len(HF_PREFIX):], task)
    else:
        model = user_model(spec.name, task, options=spec.options)
    check_fits(model, task, name=spec.name)
    return model


def _check_options(builder: Callable[..., Any], name: str, options: dict[str, Any], *,
                   given: tuple[str, ...]) -> None:
    """The options of a built-in model are its builder's keyword-only parameters, less those
    the config sets itself (width, depth, ...)."""
    takes = [p.name for p in inspect.signature(builder).parameters.values()
             if p.kind is p.KEYWORD_ONLY and p.name not in given]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ValueError(f"model {name!r} takes no option(s) {', '.join(unknown)}; its options "
                         f"are {', '.join(takes)} (and {', '.join(given)} as keys of their "
                         "own)")


def check_fits(model: nn.Module, task: Task, *, name: str) -> None:
    """Run ``model`` on two training samples and the task's loss on its output.

    Without gradients, in eval mode and with torch's random state restored afterwards, so the
    check changes nothing (no dropout draw, no BatchNorm statistics). Any error, or a loss
    that is not one finite number, is one ValueError naming the model and the task.
    """
    try:
        with restored_modes(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            loss = task.loss_fn(model(task.x_train[:2]), task.y_train[:2])
    except Exception as exc:  # noqa: BLE001 - the user's model or loss: one line
        raise ValueError(f"model {name!r} does not fit task {task.name!r}: "
                         f"{first_line(exc)}") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shown = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"the loss of task {task.name!r} on model {name!r} gives {shown}, "
                         "not one number: it must be mean-reduced over the samples")
    if not torch.isfinite(loss).all():
        raise ValueError(f"the loss of task {task.name!r} on model {name!r} is {float(loss)} "
                         "before training")
