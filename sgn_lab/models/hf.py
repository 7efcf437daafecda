"""Hugging Face transformers as plain modules: built from configs, or loaded from a local folder.

Nothing is downloaded. :func:`build_transformer` builds a model from ``GPT2Config``,
``BertConfig`` or ``ViTConfig`` with random weights, drawn from torch's global generator (so
``torch.manual_seed(s)`` before the call gives the same model); :func:`load_pretrained` reads
a model that ``save_pretrained`` wrote into a folder on this machine, and refuses anything
that is not such a folder before transformers is imported, so a bare name such as ``"gpt2"``
never reaches the Hugging Face hub. transformers itself is imported inside the functions:
``import sgn_lab`` stays fast and works without it.

What each name builds (:data:`TRANSFORMERS`), by the kind of task:

=========  ==========================================  =====================================
name       language task: x, y int64 (n, T)            classification: y int64 (n,)
=========  ==========================================  =====================================
``gpt2``   ``GPT2LMHeadModel``, logits (n, T, V)       --
``bert``   ``BertLMHeadModel`` with ``is_decoder``     ``BertForSequenceClassification`` of
           (causal attention), logits (n, T, V)        token ids x int64 (n, T), logits (n, K)
``vit``    --                                          ``ViTForImageClassification`` of
                                                       images x float32 (n, C, H, W), H = W,
                                                       logits (n, K)
=========  ==========================================  =====================================

V is the task's vocabulary (``num_classes`` of a language task), K its number of classes.
A task of examples of different lengths (``jsonl:``, ``hfdata:``; ``info["padded"]``) pads x
with ``PAD_ID = -1``: its models are wrapped with ``Logits(..., padded=True)``, which passes
``attention_mask = (x >= 0)`` and reads the padding as token 0 (:class:`Logits`).
Options: ``width`` (hidden size), ``depth`` (layers), ``heads`` (attention heads; they must
divide ``width``), ``context`` (positions of gpt2 and bert, at least the task's T; default T),
``patch_size`` (vit; default the largest of 16, 8, 4, 2, 1 that divides H and leaves at least
4 patches), ``dropout`` (every dropout probability of the config). The feed-forward width of
bert and vit is ``4 * width``, as in GPT-2.

``dropout`` defaults to 0: the SGN is the spread of the per-sample gradients of one model, and
with dropout each gradient also carries the noise of its own random mask, so the measured
noise would mix the dropout noise into the gradient noise.

Attention runs as ``attn_implementation="eager"`` (matmul, softmax, matmul) rather than
transformers' default ``"sdpa"``. Both give the exact per-sample gradients, but on the CPU
sdpa dispatches to ``aten::_scaled_dot_product_flash_attention_for_cpu`` (and its backward),
which have no ``torch.vmap`` batching rule: functorch falls back to a Python loop over the
samples, with a "performance drop" warning per call, and :func:`sgn_lab.per_sample_grads`
took 2.8x as long (GPT-2 of width 64, 2 layers, n = 256 windows of T = 64, one thread). The
eager attention is made of batched operations.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sgn_lab import checks
from sgn_lab.models.modes import restored_modes
from sgn_lab.models.names import TRANSFORMERS

if TYPE_CHECKING:  # sgn_lab.data imports sgn_lab.models: no import at run time
    from sgn_lab.data import Task


PATCH_SIZES = (16, 8, 4, 2, 1)
"""ViT patch sizes tried, largest first, when ``patch_size`` is not given."""

ATTENTION = "eager"
"""The attention implementation of every model here; see the module docstring for why."""

_KINDS = {"gpt2": ("language",), "bert": ("language", "tokens"), "vit": ("image",)}
_NEEDS = {
    "gpt2": "a language task (token ids x and next tokens y, int64 (n, T))",
    "bert": "a language task (x, y int64 (n, T)) or a classification of token ids "
            "(x int64 (n, T), y int64 (n,))",
    "vit": "an image classification task (x float (n, C, H, W), y int64 (n,))",
}


class Logits(nn.Module):
    """A Hugging Face model as a function of its input tensor to its logits.

    ``forward(x)`` is ``model(**{input_name: x}).logits``: ``input_ids`` (n, T) for GPT-2 and
    BERT, ``pixel_values`` (n, C, H, W) for ViT. The parameters are the wrapped model's own
    (``Logits(m).model is m``), so training the wrapper trains the model.

    ``padded=True`` is for token ids padded with :data:`sgn_lab.data.PAD_ID` (-1; any
    negative id is padding): ``forward(x)`` is then ``model(input_ids=x.clamp(min=0),
    attention_mask=(x >= 0).long()).logits``, so no real position attends to a padding
    position, and the padding positions read token 0 (their logits are never in the loss:
    their targets are ``IGNORE_INDEX``). The same operations for every batch, without a
    data-dependent branch, so the wrapper runs under ``torch.func.vmap``. Position ids are
    transformers' defaults (0..T-1 over the padded row): with right padding each real token
    has its usual position; with left padding the real tokens of a shorter sample sit at
    shifted positions, as in Hugging Face's own training unless ``position_ids`` are passed.
    ``padded=False`` (the default) calls the model exactly as without padding, so an
    unpadded task gives the same numbers as before.
    """

    def __init__(self, model: nn.Module, input_name: str = "input_ids", *,
                 padded: bool = False) -> None:
        super().__init__()
        if padded and input_name != "input_ids":
            raise ValueError(f"padded inputs are token ids (input_ids), not {input_name}")
        self.model = model
        self.input_name = input_name
        self.padded = bool(padded)

    def forward(self, x: Tensor) -> Tensor:
        if self.padded:
            return self.model(input_ids=x.clamp(min=0),
                              attention_mask=(x >= 0).to(torch.long)).logits
        return self.model(**{self.input_name: x}).logits


def is_padded(task: Task) -> bool:
    """True for a task of padded token ids (``info["padded"]``, :mod:`sgn_lab.data.examples`)."""
    return bool(task.info.get("padded", False))


def task_kind(task: Task) -> str:
    """``"language"`` (x, y int64 (n, T)), ``"tokens"`` (x int64 (n, T), y int64 (n,)),
    ``"image"`` (x float (n, C, H, W), y int64 (n,)) or ``"other"``."""
    x, y = task.x_train, task.y_train
    labels = y.dim() == 1 and not y.is_floating_point() and task.num_classes > 0
    if x.dim() == 2 and not x.is_floating_point():
        if task.is_sequence and y.shape == x.shape and task.num_classes > 0:
            return "language"
        if labels:
            return "tokens"
    if x.dim() == 4 and x.is_floating_point() and labels:
        return "image"
    return "other"


def build_transformer(
    name: str,
    task: Task,
    *,
    width: int = 128,
    depth: int = 2,
    heads: int = 4,
    context: int | None = None,
    patch_size: int | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """A transformer with random weights for ``task``, as a :class:`Logits` wrapper.

    ``name`` is one of :data:`TRANSFORMERS`; what it builds for which task, and the options,
    are in the module docstring. ``bert`` on a language task is ``BertLMHeadModel`` with
    ``is_decoder=True``: its attention is causal, so the logits at position t see tokens
    0..t only and next-token prediction cannot read the token it predicts.

    Raises
    ------
    ValueError
        An unknown name, a task the model cannot take, or a bad option (the message names
        the value).
    """
    checks.choice("model", name, TRANSFORMERS)
    for label, value in (("width", width), ("depth", depth), ("heads", heads)):
        checks.integer(label, value, 1)
    if width % heads:
        raise ValueError(f"width must be divisible by heads={heads}, got {width}")
    dropout = checks.coefficient("dropout", dropout)
    kind = task_kind(task)
    if kind not in _KINDS[name]:
        raise ValueError(f"model {name!r} needs {_NEEDS[name]}; {_describe(task)}")
    sizes = {"width": width, "depth": depth, "heads": heads, "dropout": dropout}
    if name == "vit":
        if context is not None:
            raise ValueError(f"context applies to gpt2 and bert, not vit; got {context!r}")
        return _vit(task, patch_size=patch_size, **sizes)
    if patch_size is not None:
        raise ValueError(f"patch_size applies to vit, not {name}; got {patch_size!r}")
    T = task.x_train.shape[1]
    positions = T if context is None else checks.integer("context", context, T)
    if kind == "language" and token_vocabulary(task) > task.num_classes:
        raise ValueError(f"task {task.name!r} has token ids up to {token_vocabulary(task) - 1}, "
                         f"outside its vocabulary of num_classes={task.num_classes}")
    if name == "gpt2":
        return _gpt2(task.num_classes, positions, padded=is_padded(task), **sizes)
    return _bert(task, kind, positions, **sizes)


def _gpt2(vocab: int, positions: int, *, padded: bool, width: int, depth: int, heads: int,
          dropout: float) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=depth, n_head=heads,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        summary_first_dropout=dropout,
        bos_token_id=None, eos_token_id=None,  # GPT-2's 50256 lies outside a small vocabulary
        use_cache=False,  # a key/value cache only serves generation
        attn_implementation=ATTENTION,
    )
    return Logits(transformers.GPT2LMHeadModel(config), padded=padded)


def _bert(task: Task, kind: str, positions: int, *, width: int, depth: int, heads: int,
          dropout: float) -> nn.Module:
    import transformers

    language = kind == "language"
    config = transformers.BertConfig(
        vocab_size=task.num_classes if language else token_vocabulary(task),
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * width, max_position_embeddings=positions,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        classifier_dropout=dropout,
        is_decoder=language,  # causal self-attention: no peeking at the next token
        num_labels=2 if language else task.num_classes,  # unused by the LM head
        use_cache=False,
        attn_implementation=ATTENTION,
    )
    padded = is_padded(task)
    if language:
        return Logits(transformers.BertLMHeadModel(config), padded=padded)
    return Logits(transformers.BertForSequenceClassification(config), padded=padded)


def _vit(task: Task, *, patch_size: int | None, width: int, depth: int, heads: int,
         dropout: float) -> nn.Module:
    import transformers

    channels, height, breadth = task.input_shape
    if height != breadth:
        raise ValueError(f"vit takes square images; task {task.name!r} has images of "
                         f"{height}x{breadth}")
    config = transformers.ViTConfig(
        image_size=height, patch_size=_patch(height, patch_size), num_channels=channels,
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * width, num_labels=task.num_classes,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        attn_implementation=ATTENTION,
    )
    return Logits(transformers.ViTForImageClassification(config), "pixel_values")


def _patch(size: int, patch_size: int | None) -> int:
    """The ViT patch size for images of ``size`` x ``size``: it divides ``size`` (a patch
    that does not would drop the last pixels), leaving at least 4 patches by default."""
    if patch_size is not None:
        checks.integer("patch_size", patch_size, 1)
        if size % patch_size:
            raise ValueError(f"patch_size must divide the image size {size}, got {patch_size}")
        return patch_size
    for patch in PATCH_SIZES:
        if size % patch == 0 and (size // patch) ** 2 >= 4:
            return patch
    raise ValueError(f"vit needs images of at least 2x2 pixels (4 patches), got {size}x{size}")


def token_vocabulary(task: Task) -> int:
    """The vocabulary of a token task's inputs: ``info["vocab_size"]`` where the task says,
    at least one more than the largest token id in its train and test inputs."""
    largest = max(int(x.max()) for x in (task.x_train, task.x_test) if x.numel())
    return max(int(task.info.get("vocab_size") or 0), largest + 1)


def load_pretrained(path: str | os.PathLike[str], task: Task) -> nn.Module:
    """A model that ``save_pretrained`` wrote into the local folder ``path``, for ``task``.

    The folder must exist and hold ``config.json``; this is checked before transformers is
    imported, so a name that is not a folder (``"gpt2"``) is a FileNotFoundError and never
    reaches the hub. The class is the config's ``architectures[0]`` from transformers (no
    remote code), loaded with ``local_files_only=True`` and eager attention (module
    docstring), and wrapped in :class:`Logits` with the model's own input: ``pixel_values``
    for image models, ``input_ids`` for the others. The model is returned in train mode, like
    a freshly built one, so the dropout probabilities of the saved config apply in training
    (they are not reset to 0); its key/value cache, which only serves generation, is off.

    It must fit the task: a language task (x, y int64 (n, T)) needs a causal language model
    with at least the task's vocabulary and T positions; a classification task needs
    ``num_labels`` equal to its classes and the matching input (token ids, or images of the
    model's size). The model is run once on two training samples to confirm the logits'
    shape and, for a language task, that no logit sees a later token.

    Raises
    ------
    FileNotFoundError
        ``path`` is not a folder, or holds no ``config.json``.
    ValueError
        An unknown architecture, or a model that does not fit the task (the message names
        both numbers).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder {str(path)!r}: hf:PATH takes a folder written "
                                "by save_pretrained (nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(path)!r} holds no config.json: hf:PATH "
                                "takes a folder written by save_pretrained")
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    model = _architecture(config, str(path)).from_pretrained(
        folder, config=config, local_files_only=True, attn_implementation=ATTENTION)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode; see the docstring
    wrapped = Logits(model, model.main_input_name,
                     padded=is_padded(task) and model.main_input_name == "input_ids")
    _check_fits(wrapped, task, str(path))
    return wrapped


def _architecture(config: Any, where: str) -> type:
    import transformers

    names = getattr(config, "architectures", None) or []
    if not names:
        raise ValueError(f"the config.json of {where!r} names no architecture")
    try:
        cls = getattr(transformers, names[0])
    except (AttributeError, ImportError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"unknown architecture {names[0]!r} in the config.json of {where!r}: "
                         "not a model class of transformers")
    return cls


def _check_fits(model: Logits, task: Task, where: str) -> None:
    """The checks of :func:`load_pretrained` against the task (its docstring says which)."""
    config, kind = model.model.config, task_kind(task)
    if kind == "other":
        raise ValueError(f"model {where!r} needs a language or classification task; "
                         f"{_describe(task)}")
    want = "pixel_values" if kind == "image" else "input_ids"
    if model.input_name != want:
        raise ValueError(f"model {where!r} takes {model.input_name}, and {_describe(task)}, "
                         f"which needs a model of {want}")
    if kind == "language" and getattr(config, "vocab_size", 0) < task.num_classes:
        raise ValueError(f"model {where!r} has a vocabulary of {config.vocab_size} tokens, "
                         f"fewer than the {task.num_classes} of task {task.name!r}")
    if kind == "tokens" and getattr(config, "vocab_size", 0) < token_vocabulary(task):
        raise ValueError(f"model {where!r} has a vocabulary of {config.vocab_size} tokens; "
                         f"task {task.name!r} uses token ids up to "
                         f"{token_vocabulary(task) - 1}")
    if kind != "language" and config.num_labels != task.num_classes:
        raise ValueError(f"model {where!r} has num_labels={config.num_labels}; task "
                         f"{task.name!r} has {task.num_classes} classes")
    positions = getattr(config, "max_position_embeddings", None)
    if kind != "image" and positions is not None and positions < task.x_train.shape[1]:
        raise ValueError(f"model {where!r} has {positions} positions, fewer than the "
                         f"T={task.x_train.shape[1]} of task {task.name!r}")
    _probe(model, task, kind, where)


def _probe(model: Logits, task: Task, kind: str, where: str) -> None:
    """Run the model on two training samples: the logits' shape and, for a language task,
    causality (changing the last token changes no earlier logit of a real token). In eval
    mode, without gradients and with torch's random state restored, so nothing changes."""
    x = task.x_train[:2]
    with restored_modes(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
        model.eval()
        logits = model(x)
        if kind == "language":
            changed = x.clone()
            changed[:, -1] = (x[:, -1] + 1) % task.num_classes
            later = model(changed)
    if kind == "language":
        fits = logits.dim() == 3 and logits.shape[:2] == x.shape
        expected = f"({len(x)}, {x.shape[1]}, V)"
    else:
        fits = logits.shape == (len(x), task.num_classes)
        expected = f"({len(x)}, {task.num_classes})"
    if not fits:
        raise ValueError(f"model {where!r} gives logits of shape {tuple(logits.shape)} on two "
                         f"samples of task {task.name!r}, not {expected}")
    # Padding positions are left out: their targets are ignored, and a left-padding query
    # that may attend to no key gets uniform weights over all of them, the last included.
    earlier = (x[:, :-1] >= 0) if model.padded else torch.ones_like(x[:, :-1], dtype=torch.bool)
    if kind == "language" and not torch.allclose(logits[:, :-1][earlier],
                                                 later[:, :-1][earlier]):
        raise ValueError(f"model {where!r} is not causal: its logits at earlier positions "
                         "change with the last token, so next-token prediction would see "
                         "its targets")


def _describe(task: Task) -> str:
    x, y = task.x_train, task.y_train
    return (f"task {task.name!r} has inputs (n, {', '.join(map(str, x.shape[1:]))}) "
            f"{str(x.dtype).removeprefix('torch.')} and targets "
            f"(n{''.join(f', {s}' for s in y.shape[1:])}) "
            f"{str(y.dtype).removeprefix('torch.')}")
