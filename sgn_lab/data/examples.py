"""Tasks of examples of different lengths: ``jsonl:PATH`` and ``hfdata:DIR``, padded.

A file of examples (one JSON object per line, or a ``datasets`` folder written by
``save_to_disk``) holds a text field and, for classification, a label field. Each text becomes
token ids t_0 … t_{L-1} (bytes, characters, or a tokenizer saved by ``save_pretrained``),
truncated to at most ``context`` tokens; the examples are padded to one length T, the longest
example (at most ``context``), so that a task's x stays one int64 tensor (n, T) that every
part of sgn-lab indexes as it is.

The padding convention
    x_ij = :data:`PAD_ID` (-1) at padding positions, so the attention mask is ``x >= 0``
    (:func:`attention_mask`); the padding sits after the tokens (``padding="right"``, the
    default) or before them (``"left"``). A model of the task calls its network on
    ``x.clamp(min=0)`` with that mask (:class:`sgn_lab.models.hf.Logits` with
    ``padded=True``, which the builders choose for a padded task).

Causal language modelling (no label field)
    x_i = (t_0 … t_{L-1}, padding), y_i (T,) int64 with y_it = t_{t+1} at the real positions
    but the last, and :data:`IGNORE_INDEX` (-100) at the last real position (it has no next
    token) and at the padding. Right padding, L = 3, T = 5::

        x_i = [t0, t1, t2, -1, -1]      y_i = [t1, t2, -100, -100, -100]

    Left padding puts both rows' padding first: x_i = [-1, -1, t0, t1, t2],
    y_i = [-100, -100, t1, t2, -100]. An example needs L ≥ 2 tokens (one target).

Sequence classification (``label_field``)
    x_i as above (no shift), y (n,) int64 class labels in [0, K).

The loss
    Sample i's loss ℓ_i is the mean over its real targets (L_i − 1 of them for language
    modelling), and a batch's loss the mean over samples (1/n) Σ ℓ_i, not the mean over all
    tokens of the batch (:func:`sgn_lab.models.losses.token_cross_entropy`). The probe's mean
    gradient is the mean of these per-sample gradients, and the training loss the mean of
    these per-sample losses; ``info["loss_average"]`` says so in words.

``info`` of such a task: ``"path"``, ``"format"`` (``"jsonl"`` or ``"hfdata"``),
``"objective"`` (``"language"`` or ``"classification"``), ``"text_field"``, ``"label_field"``,
``"tokens"`` (``"byte"``, ``"char"`` or ``"tokenizer"``), ``"tokenizer"`` (its folder, or
None), ``"vocab"`` (the characters for ``"char"``, else None), ``"vocab_size"``, ``"context"``
(the most tokens kept of an example), ``"length"`` T, ``"padded"`` True, ``"padding"``
(``"right"`` or ``"left"``), ``"pad_id"`` -1, ``"ignore_index"`` -100, ``"truncated"`` (how
many examples were cut to ``context``), ``"split"`` (``"file"``: the dataset's own test split,
or ``"seeded"``) and ``"loss_average"``.

Bad input is one ValueError (FileNotFoundError for a missing file or folder) naming the file
and the line (the split and row of a dataset) and the value: invalid JSON, a line that is no
JSON object, a missing field, a text that is empty or no string, too short for a next-token
target, a label that is no integer or outside [0, classes), an unreadable tokenizer folder.
An example longer than ``context`` is truncated, and one :class:`DataWarning` per file says how
many were and names the first.
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sgn_lab.checks import choice, fraction, integer, seed_value
from sgn_lab.data.catalog import DataWarning
from sgn_lab.data.language import TOKEN_KINDS, encode_texts, token_tensor
from sgn_lab.data.split import DEFAULT_TEST_FRACTION, Task, assemble_task
from sgn_lab.models.losses import IGNORE_INDEX, LOSS_AVERAGE
from sgn_lab.user import first_line

PAD_ID = -1
"""The token id of padding in the inputs x of a padded task: the attention mask is x >= 0."""

PADDING_SIDES = ("right", "left")
"""Where the padding of a shorter example goes: after its tokens, or before them."""

TOKENIZER_PREFIX = "tokenizer:"
"""``tokens="tokenizer:DIR"``: the same as ``tokenizer="DIR"``."""

# What save_pretrained writes for the common tokenizers: one of them must be in the folder
# before transformers is imported (a bare name such as "gpt2" would otherwise reach the hub).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


@dataclass(frozen=True)
class _Example:
    where: str  # "'data.jsonl', line 3": for messages
    text: str
    label: int | None


def load_jsonl(
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str | None = None,
    classes: int | None = None,
    context: int = 64,
    tokens: str = "byte",
    tokenizer: str | os.PathLike[str] | None = None,
    padding: str | None = None,
    seed: int = 0,
    test_fraction: float | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Task:
    """A JSON-lines file of examples of different lengths as a padded task (module docstring).

    Each non-blank line is one JSON object with a text under ``text_field`` and, for
    classification, an integer label under ``label_field``. A seeded random
    ``test_fraction`` of the examples (default 0.25) is held out.

    Parameters
    ----------
    path
        The file (UTF-8). As a task string: ``jsonl:PATH``; options as keywords of
        :func:`sgn_lab.data.load_task` (``--task-options`` on the command line).
    text_field, label_field
        The keys of the text and of the label. ``label_field=None`` (default): causal
        language modelling on the texts; else sequence classification.
    classes
        K, the number of classes (labels must lie in [0, K)); default: the largest label + 1.
    context
        The most tokens kept of an example; longer ones are truncated (one warning). The
        task's length T is the longest example after truncation.
    tokens
        ``"byte"`` (UTF-8 bytes, vocabulary 256), ``"char"`` (the distinct characters of all
        examples) as for ``text:`` tasks, or ``"tokenizer:DIR"``.
    tokenizer
        A folder written by a tokenizer's ``save_pretrained`` (read by transformers'
        ``AutoTokenizer`` with ``local_files_only=True``; nothing is downloaded). Its special
        tokens are added as it adds them, and its ``padding_side`` is the default padding.
    padding
        ``"right"`` or ``"left"`` (:data:`PADDING_SIDES`); default: the tokenizer's
        ``padding_side``, else ``"right"``.
    seed, test_fraction, n_train, n_test
        As in :func:`sgn_lab.data.load_task`.

    Returns
    -------
    Task
        x int64 (n, T) padded with :data:`PAD_ID`; y int64 (n, T) next tokens with
        :data:`IGNORE_INDEX`, or (n,) labels; ``info["padded"]`` True (module docstring).

    Raises
    ------
    FileNotFoundError
        ``path`` or the tokenizer folder does not exist.
    ValueError
        Bad input, named by file, line and value (module docstring), or a bad option.
    """
    options = _options(text_field=text_field, label_field=label_field, classes=classes,
                       context=context, tokens=tokens, tokenizer=tokenizer, padding=padding)
    seed = seed_value("seed", seed)
    if test_fraction is None:
        test_fraction = DEFAULT_TEST_FRACTION
    fraction("test_fraction", test_fraction)
    path = Path(path).expanduser()
    examples = _read_jsonl(path, options["text_field"], options["label_field"])
    return _padded_task(f"jsonl:{path}", {"train": examples}, options, path=str(path),
                        source="jsonl", seed=seed, test_fraction=test_fraction,
                        n_train=n_train, n_test=n_test)


def load_hfdata(
    folder: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str | None = None,
    classes: int | None = None,
    context: int = 64,
    tokens: str = "byte",
    tokenizer: str | os.PathLike[str] | None = None,
    padding: str | None = None,
    seed: int = 0,
    test_fraction: float | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Task:
    """A dataset written by the ``datasets`` library's ``save_to_disk`` as a padded task.

    A ``Dataset`` is split like a jsonl file (a seeded ``test_fraction``, default 0.25); a
    ``DatasetDict`` needs a ``train`` split and takes its ``test`` split, when it has one, as
    the fixed test set (then ``test_fraction`` does not apply; other splits are not read).
    Options, returns and errors as in :func:`load_jsonl`, a row of a split standing for a line.
    ``datasets`` (extra ``hf``) is imported only here, after the folder is checked.

    Parameters
    ----------
    folder
        The folder. As a task string: ``hfdata:DIR``.
    """
    options = _options(text_field=text_field, label_field=label_field, classes=classes,
                       context=context, tokens=tokens, tokenizer=tokenizer, padding=padding)
    seed = seed_value("seed", seed)
    folder = Path(folder).expanduser()
    splits = _read_hfdata(folder, options["text_field"], options["label_field"])
    if "test" in splits and test_fraction is not None:
        raise ValueError(f"dataset {str(folder)!r} has a test split; test_fraction="
                         f"{test_fraction!r} does not apply")
    if "test" not in splits:
        test_fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        fraction("test_fraction", test_fraction)
    return _padded_task(f"hfdata:{folder}", splits, options, path=str(folder), source="hfdata",
                        seed=seed, test_fraction=test_fraction, n_train=n_train, n_test=n_test)


def padded_batch(
    sequences: Sequence[Sequence[int] | np.ndarray | Tensor],
    *,
    labels: Sequence[int] | np.ndarray | Tensor | None = None,
    padding: str = "right",
    length: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Token sequences of different lengths as one padded (x, y) pair (module docstring).

    ``sequences``: n sequences of non-negative token ids, each of length 1 ≤ L_i ≤ T, with
    T = ``length`` (default: the longest). Returns x int64 (n, T), :data:`PAD_ID` at the
    padding (after the tokens for ``padding="right"``, before them for ``"left"``), and y:
    without ``labels``, the next tokens (n, T), :data:`IGNORE_INDEX` at each last real position
    and at the padding; with ``labels`` (n,), y = labels int64.
    """
    choice("padding", padding, PADDING_SIDES)
    rows = [np.asarray(s.cpu() if isinstance(s, Tensor) else s, dtype=np.int64).reshape(-1)
            for s in sequences]
    if not rows:
        raise ValueError("padded_batch needs at least one sequence")
    lengths = np.array([len(r) for r in rows])
    T = int(lengths.max()) if length is None else integer("length", length, 1)
    for i, r in enumerate(rows):
        if not 1 <= len(r) <= T:
            raise ValueError(f"sequence {i} has {len(r)} tokens; each needs 1 to {T}")
        if r.min() < 0:
            raise ValueError(f"sequence {i} holds the negative token id {int(r.min())}: "
                             "negative ids mark padding")
    positions = np.arange(T)
    real = (positions < lengths[:, None] if padding == "right"
            else positions >= T - lengths[:, None])  # (n, T)
    x = np.full(real.shape, PAD_ID, dtype=np.int64)
    x[real] = np.concatenate(rows)  # row-major order: each row's tokens in turn
    if labels is not None:
        y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
        if y.shape != (len(rows),):
            raise ValueError(f"labels must have shape ({len(rows)},), got {y.shape}")
        return token_tensor(x), token_tensor(y)
    # y_t = x_{t+1} where both positions are real: the last real position has no next token.
    y = np.full(real.shape, IGNORE_INDEX, dtype=np.int64)
    nxt = real[:, :-1] & real[:, 1:]
    y[:, :-1][nxt] = x[:, 1:][nxt]
    return token_tensor(x), token_tensor(y)


def attention_mask(x: Tensor) -> Tensor:
    """The attention mask of padded token ids x (n, T): 1 at real tokens, 0 at :data:`PAD_ID`,
    int64 (n, T), as Hugging Face models take it."""
    return (x >= 0).to(torch.long)


def _options(*, text_field: Any, label_field: Any, classes: Any, context: Any, tokens: Any,
             tokenizer: Any, padding: Any) -> dict[str, Any]:
    """The options of both loaders, checked; ``tokenizer`` as a folder (Path) or None."""
    for name, value in (("text_field", text_field), ("label_field", label_field)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{name} must be a field name (text), got {value!r}")
    if text_field is None:
        raise ValueError("text_field must be a field name (text), got None")
    if label_field == text_field:
        raise ValueError(f"label_field and text_field are both {text_field!r}")
    if classes is not None:
        if label_field is None:
            raise ValueError(f"classes={classes!r} applies to classification: give label_field")
        integer("classes", classes, 2)
    language = label_field is None
    integer("context", context, 2 if language else 1)
    if not isinstance(tokens, str):
        raise ValueError(f"tokens must be one of byte, char, tokenizer:DIR, got {tokens!r}")
    if tokens.startswith(TOKENIZER_PREFIX):
        if tokenizer is not None:
            raise ValueError(f"give the tokenizer once: tokens={tokens!r} and "
                             f"tokenizer={str(tokenizer)!r}")
        tokenizer = tokens[len(TOKENIZER_PREFIX):]
        if not tokenizer:
            raise ValueError("tokens='tokenizer:' needs a folder: write tokenizer:DIR")
    elif tokens not in TOKEN_KINDS:
        raise ValueError(f"tokens must be one of byte, char, tokenizer:DIR, got {tokens!r}")
    elif tokenizer is not None and tokens != "byte":
        raise ValueError(f"tokens={tokens!r} and tokenizer={str(tokenizer)!r}: choose one")
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        raise ValueError(f"tokenizer must be a folder, got {tokenizer!r}")
    if padding is not None:
        choice("padding", padding, PADDING_SIDES)
    return {"text_field": text_field, "label_field": label_field, "classes": classes,
            "context": context, "tokens": "tokenizer" if tokenizer is not None else tokens,
            "tokenizer": None if tokenizer is None else Path(tokenizer).expanduser(),
            "padding": padding}


def _read_jsonl(path: Path, text_field: str, label_field: str | None) -> list[_Example]:
    """The examples of a JSON-lines file, each checked (module docstring)."""
    if not path.exists():
        raise FileNotFoundError(f"jsonl file not found: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not a jsonl file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{str(path)!r}, line {line}: not UTF-8 text (invalid byte "
                         f"{data[exc.start]:#04x})") from None
    examples = []
    # split("\n") rather than splitlines(): JSON strings may hold U+2028 and other characters
    # that splitlines() would take for line ends, and the line numbers are an editor's.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) hold no example
        where = f"{str(path)!r}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}): "
                             f"{_shown(line)}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a JSON object: {_shown(line)}")
        examples.append(_example(where, record, text_field, label_field))
    return examples


def _read_hfdata(folder: Path, text_field: str, label_field: str | None
                 ) -> dict[str, list[_Example]]:
    """The examples of each split read (``train``, and ``test`` when present)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no dataset folder {str(folder)!r}: hfdata:DIR takes a folder "
                                "written by save_to_disk (nothing is downloaded)")
    if not any((folder / f).is_file() for f in ("dataset_dict.json", "state.json")):
        raise FileNotFoundError(f"dataset folder {str(folder)!r} holds neither "
                                "dataset_dict.json nor state.json: hfdata:DIR takes a folder "
                                "written by save_to_disk")
    try:
        import datasets
    except ImportError:
        raise ValueError("hfdata: tasks need the datasets package: pip install "
                         "'sgn-lab[hf]'") from None
    try:
        data = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 - pyarrow, json, OSError...: one line
        raise ValueError(f"dataset folder {str(folder)!r} cannot be read: "
                         f"{first_line(exc)}") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"dataset {str(folder)!r} has splits {sorted(data)}, no 'train'")
        parts = {name: data[name] for name in ("train", "test") if name in data}
    else:
        parts = {"train": data}
    splits = {}
    for name, part in parts.items():
        fields = [text_field] + ([label_field] if label_field is not None else [])
        label = f"split {name!r} of " if isinstance(data, datasets.DatasetDict) else ""
        for field in fields:
            if field not in part.column_names:
                raise ValueError(f"{label}dataset {str(folder)!r} has no column {field!r} "
                                 f"(columns: {', '.join(map(repr, part.column_names))})")
        columns = {f: part[f] for f in fields}  # whole columns: one read, not one per row
        where = f"{str(folder)!r}" + (f", split {name!r}" if label else "")
        splits[name] = [
            _example(f"{where}, row {i}", {f: columns[f][i] for f in fields}, text_field,
                     label_field)
            for i in range(len(part))
        ]
    return splits


def _example(where: str, record: dict[str, Any], text_field: str, label_field: str | None
             ) -> _Example:
    if text_field not in record:
        raise ValueError(f"{where}: no field {text_field!r} (fields: "
                         f"{', '.join(map(repr, record)) or 'none'})")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {_shown(text)}, not a string")
    if not text:
        raise ValueError(f"{where}: field {text_field!r} is empty")
    label = None
    if label_field is not None:
        if label_field not in record:
            raise ValueError(f"{where}: no field {label_field!r} (fields: "
                             f"{', '.join(map(repr, record)) or 'none'})")
        label = record[label_field]
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise ValueError(f"{where}: label {label_field!r} is {_shown(label)}, not an "
                             "integer class id")
        if label < 0:
            raise ValueError(f"{where}: label {label_field!r} is {label}, outside [0, classes)")
        label = int(label)
    return _Example(where, text, label)


def _shown(value: Any) -> str:
    """A value for a one-line message: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _padded_task(name: str, splits: dict[str, list[_Example]], options: dict[str, Any], *,
                 path: str, source: str, seed: int, test_fraction: float | None,
                 n_train: int | None, n_test: int | None) -> Task:
    """Tokenise, truncate, pad and split (seeded, unless a test split is given)."""
    label_field, context = options["label_field"], options["context"]
    language = label_field is None
    examples = [e for part in splits.values() for e in part]
    if len(examples) < 2:
        raise ValueError(f"{path!r} holds {len(examples)} example(s); a task needs at least 2 "
                         "(one to train on, one to test)")
    tokenizer = options["tokenizer"]
    texts = [e.text for e in examples]
    if tokenizer is None:
        ids, vocab = encode_texts(texts, options["tokens"])
        vocab_size, side = (256 if vocab is None else len(vocab)), "right"
        kept = [i[:context] for i in ids]
    else:
        ids, kept, vocab_size, side = _tokenise(tokenizer, texts, context)
        vocab = None
    padding = options["padding"] or side
    for e, i in zip(examples, ids, strict=True):
        if len(i) == 0:  # a tokenizer may map some text (only spaces) to nothing
            raise ValueError(f"{e.where}: field {options['text_field']!r} gives no tokens: "
                             f"{_shown(e.text)}")
        if language and len(i) < 2:
            raise ValueError(f"{e.where}: field {options['text_field']!r} is one token "
                             f"({_shown(e.text)}); next-token prediction needs at least 2")
    long = [k for k, i in enumerate(ids) if len(i) > context]
    if long:
        first = examples[long[0]]
        warnings.warn(f"{first.where}: {len(long)} example(s) longer than context={context} "
                      f"tokens truncated to {context} (this one has {len(ids[long[0]])})",
                      DataWarning, stacklevel=3)
    if language:
        classes = vocab_size
    else:
        labels = np.array([e.label for e in examples])
        classes = options["classes"] or int(labels.max()) + 1
        outside = np.flatnonzero(labels >= classes)
        if len(outside):
            e = examples[outside[0]]
            raise ValueError(f"{e.where}: label {label_field!r} is {e.label}, outside [0, "
                             f"{classes}) (classes={classes})")
        if classes < 2:
            raise ValueError(f"{path!r}: every label is 0; classification needs 2 classes")
    length = max(len(i) for i in kept)
    x, y = padded_batch(kept, labels=None if language else [e.label for e in examples],
                        padding=padding, length=length)
    x, y = x.numpy(), y.numpy()
    info = {
        "path": path, "format": source, "objective": "language" if language else
        "classification", "text_field": options["text_field"], "label_field": label_field,
        "tokens": options["tokens"], "tokenizer": None if tokenizer is None else str(tokenizer),
        "vocab": vocab, "vocab_size": vocab_size, "context": context, "length": length,
        "padded": True, "padding": padding, "pad_id": PAD_ID, "ignore_index": IGNORE_INDEX,
        "truncated": len(long), "split": "file" if "test" in splits else "seeded",
        "loss_average": LOSS_AVERAGE,
    }
    fixed = {}
    if "test" in splits:
        n = len(splits["train"])
        fixed = {"x_test": x[n:], "y_test": y[n:]}
        x, y = x[:n], y[:n]
    return assemble_task(name, x, y, classes, info, rng=np.random.default_rng(seed),
                     test_fraction=test_fraction, n_train=n_train, n_test=n_test,
                     to_inputs=token_tensor, **fixed)


def _tokenise(folder: Path, texts: list[str], context: int
              ) -> tuple[list[list[int]], list[list[int]], int, str]:
    """Token ids of each text in full and as kept (at most ``context``, the tokenizer's own
    truncation, so that its closing special tokens stay), its vocabulary size and its
    padding side."""
    tokenizer = load_tokenizer(folder)
    try:
        full = tokenizer(texts)["input_ids"]
        long = [k for k, i in enumerate(full) if len(i) > context]
        kept = list(full)
        if long:
            cut = tokenizer([texts[k] for k in long], truncation=True,
                            max_length=context)["input_ids"]
            for k, ids in zip(long, cut, strict=True):
                kept[k] = ids
    except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot encode: one line
        raise ValueError(f"tokenizer {str(folder)!r} cannot encode the texts: "
                         f"{first_line(exc)}") from None
    side = getattr(tokenizer, "padding_side", "right")
    return ([np.asarray(i, dtype=np.int64) for i in full],
            [np.asarray(i, dtype=np.int64) for i in kept], len(tokenizer),
            side if side in PADDING_SIDES else "right")


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """A tokenizer that ``save_pretrained`` wrote into the local folder ``folder``.

    The folder must exist and hold a tokenizer file (:data:`TOKENIZER_FILES`); this is checked
    before transformers is imported, so a name that is not a folder (``"gpt2"``) never reaches
    the hub. Loaded with ``AutoTokenizer.from_pretrained(folder, local_files_only=True)``.

    Raises
    ------
    FileNotFoundError
        ``folder`` is not a folder, or holds no tokenizer file.
    ValueError
        transformers cannot read it (a corrupt file; the message has the first line of why).
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer folder {str(folder)!r}: tokenizer= takes a "
                                "folder written by save_pretrained (nothing is downloaded)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} holds no tokenizer file "
                                f"({', '.join(TOKENIZER_FILES[:4])}, ...): tokenizer= takes a "
                                "folder written by save_pretrained")
    try:
        import transformers
    except ImportError:
        raise ValueError("a tokenizer folder needs the transformers package: pip install "
                         "'sgn-lab[hf]'") from None
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - json, tokenizers, OSError...: one line
        raise ValueError(f"tokenizer folder {str(folder)!r} cannot be read: "
                         f"{first_line(exc)}") from None
