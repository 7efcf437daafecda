"""Language tasks: next-token prediction on a local text file and on a synthetic Markov language.

One sample of a language task is one *window* of T tokens: the input x = (t_s, …, t_{s+T-1})
and the target y = (t_{s+1}, …, t_{s+T}), the same tokens shifted by one, both int64 of shape
(T,). A model maps x (n, T) to logits (n, T, V); the loss of a window is the mean of its T
per-token cross entropies, and the loss of a batch is the mean over its windows
(:func:`sgn_lab.models.losses.token_cross_entropy`). Training, per-sample gradients, the Gram
path and evaluation all use this one definition, so "per-sample" always means "per window".

``text:PATH``  a UTF-8 text file, read as bytes (vocabulary 256) or as characters (the
               distinct characters of the file): consecutive, non-overlapping windows
``markov``     a seeded first-order Markov chain over V tokens, one independent stationary
               chain per window, with its exact entropy rate (the floor of the test loss)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sgn_lab.checks import array, choice, fraction, integer, number, seed_value
from sgn_lab.data.split import DEFAULT_TEST_FRACTION, Task, assemble_task

TOKEN_KINDS = ("byte", "char")
"""Tokenisations of ``text:`` tasks: UTF-8 bytes (vocabulary 256) or the file's characters."""


def load_text(
    path: str | os.PathLike[str],
    *,
    context: int = 64,
    tokens: str = "byte",
    seed: int = 0,
    test_fraction: float | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Task:
    """Load a UTF-8 text file as a next-token language task.

    The file becomes a token sequence t_0 … t_{L-1}: its bytes (``tokens="byte"``, ids 0..255,
    vocabulary 256) or its characters (``tokens="char"``; the vocabulary is the distinct
    characters of the file sorted by code point, and a character's id is its index there).
    The file is taken exactly as it is: nothing is stripped or normalised (newlines, a BOM).
    Window k starts at s = kT and has input ``x_k = t[s : s+T]`` and target
    ``y_k = t[s+1 : s+T+1]``, so the targets of different windows do not overlap and there are
    n = (L − 1) // T windows (a shorter tail is dropped). A seeded random ``test_fraction`` of
    the windows (default 0.25) is held out.

    Parameters
    ----------
    path
        The text file. As a task string: ``text:PATH``; the path may contain ``:`` and ``,``,
        so options are given only as keywords of :func:`load_task`.
    context
        T, the window length in tokens.
    tokens
        ``"byte"`` or ``"char"`` (:data:`TOKEN_KINDS`).
    seed, test_fraction, n_train, n_test
        As in :func:`load_task`.

    Returns
    -------
    Task
        Inputs and targets int64 of shape (n, T); ``num_classes`` is the vocabulary size;
        ``info`` has ``"path"``, ``"tokens"``, ``"context"``, ``"vocab"`` (the list of
        characters for ``"char"``, None for bytes) and ``"vocab_size"``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        A folder, a file that is not UTF-8 (the message gives the byte offset), a file too short
        for two windows, or a bad ``context`` or ``tokens``.
    """
    context = integer("context", context, 1)
    choice("tokens", tokens, TOKEN_KINDS)
    seed = seed_value("seed", seed)
    if test_fraction is None:
        test_fraction = DEFAULT_TEST_FRACTION
    fraction("test_fraction", test_fraction)
    path = Path(path).expanduser()
    ids, vocab = _read_tokens(path, tokens)
    n = (len(ids) - 1) // context
    if n < 2:
        raise ValueError(
            f"{str(path)!r} has {len(ids)} {tokens} tokens: too short for 2 windows of "
            f"context={context} (needs at least {2 * context + 1})"
        )
    x, y = _windows(ids, context, n)
    info = {
        "path": str(path),
        "tokens": tokens,
        "context": context,
        "vocab": vocab,
        "vocab_size": 256 if vocab is None else len(vocab),
    }
    return assemble_task(
        f"text:{path}", x, y, info["vocab_size"], info, rng=np.random.default_rng(seed),
        test_fraction=test_fraction, n_train=n_train, n_test=n_test, to_inputs=token_tensor,
    )


def _read_tokens(path: Path, tokens: str) -> tuple[np.ndarray, list[str] | None]:
    """The file's token ids (L,) int64, and its character vocabulary (None for bytes)."""
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not a text file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")  # byte tokens too: the task promises a UTF-8 text file
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text: invalid byte {data[exc.start]:#04x} at byte "
            f"offset {exc.start}"
        ) from None
    ids, vocab = encode_texts([text], tokens)
    return ids[0], vocab


def encode_texts(texts: list[str], tokens: str) -> tuple[list[np.ndarray], list[str] | None]:
    """Token ids of each text, (L_k,) int64, by ``tokens`` (:data:`TOKEN_KINDS`), and the
    character vocabulary (None for bytes).

    ``"byte"``: the UTF-8 bytes of each text (ids 0..255). ``"char"``: the vocabulary is the
    distinct characters of all the texts together, sorted by code point, and a character's id
    is its index there, so every text of one data set shares one vocabulary.
    """
    if tokens == "byte":
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64)
                for t in texts], None
    # UTF-32 gives one code point per 4-byte unit; np.unique sorts them, and its inverse is
    # each character's index in that sorted vocabulary, without a Python loop over the text.
    codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    vocab_codes, ids = np.unique(codes, return_inverse=True)
    ids = ids.astype(np.int64).reshape(-1)
    ends = np.cumsum([len(t) for t in texts])  # len counts code points: one UTF-32 unit each
    return np.split(ids, ends[:-1]), [chr(c) for c in vocab_codes.tolist()]


def _windows(ids: np.ndarray, context: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``x[k] = ids[kT : kT+T]`` and targets ``y[k] = ids[kT+1 : kT+T+1]``, (n, T)."""
    starts = np.arange(n)[:, None] * context + np.arange(context)
    return ids[starts], ids[starts + 1]


def token_tensor(x: np.ndarray) -> Tensor:
    """Token ids as an int64 tensor (the inputs of a language task are ids, not floats)."""
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.long)


def markov_stationary(transition: np.ndarray) -> np.ndarray:
    """The stationary distribution π (V,) of a row-stochastic transition matrix P (V, V).

    Solves πP = π with Σ_i π_i = 1: the V equations (Pᵀ − I)π = 0 have rank V − 1 for an
    irreducible chain, so one of them is replaced by the normalisation.
    """
    p = _transition("transition", transition)
    v = len(p)
    a = p.T - np.eye(v)
    a[-1] = 1.0
    b = np.zeros(v)
    b[-1] = 1.0
    try:
        pi = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        pi = np.full(v, np.nan)
    if not np.all(np.isfinite(pi)) or pi.min() < -1e-9 or np.abs(pi @ p - pi).max() > 1e-9:
        raise ValueError(
            "transition has no unique stationary distribution: the chain is reducible (for the "
            "markov task, a larger concentration makes that unlikely)"
        )
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def markov_entropy_rate(transition: np.ndarray, stationary: np.ndarray) -> float:
    """H = −Σ_i π_i Σ_j P_ij log P_ij, in nats per token (0 log 0 = 0).

    For a chain started at π, the next token x_{t+1} given the past x_{≤t} has conditional
    entropy H(P_{x_t}), and x_t ~ π at every t; so H is the expected loss per token of the best
    possible predictor, and the floor of the expected next-token cross entropy of any model.
    """
    p = _transition("transition", transition)
    pi = array("stationary", stationary)
    if pi.shape != (len(p),):
        raise ValueError(f"stationary must have shape ({len(p)},), got {pi.shape}")
    log_p = np.log(p, out=np.zeros_like(p), where=p > 0)
    return float(-(pi @ (p * log_p).sum(axis=1)))


def _transition(name: str, value: Any) -> np.ndarray:
    """A float64 row-stochastic square matrix (rows non-negative, summing to 1 within 1e-9)."""
    p = array(name, value)
    if p.ndim != 2 or p.shape[0] != p.shape[1] or p.size == 0:
        raise ValueError(f"{name} must be a square matrix, got shape {p.shape}")
    if p.min() < 0 or np.abs(p.sum(axis=1) - 1.0).max() > 1e-9:
        raise ValueError(f"{name} must have non-negative rows that sum to 1")
    return p


def markov_tokens(
    rng: np.random.Generator,
    seed: int,
    *,
    n: int = 2000,
    vocab: int = 16,
    context: int = 32,
    concentration: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """The ``markov`` task: n windows of a random first-order Markov chain over ``vocab``
    tokens (a builder of :mod:`sgn_lab.data.tasks`).

    Each row P_i of the transition matrix is drawn from Dirichlet(α, …, α) with
    α = ``concentration`` (small α: few likely successors, a predictable language; large α:
    near-uniform rows). Every window is its own chain x_0 … x_T with x_0 ~ π and
    x_{t+1} ~ P_{x_t}; input (x_0 … x_{T-1}), target (x_1 … x_T). Independent windows make the
    samples i.i.d., as the noise measurements assume (windows cut from one long chain would be
    correlated across their boundaries, and a test window would share its boundary token with
    a training window); starting at π makes every window stationary, so the entropy rate is
    the floor of each token's expected loss, not only of a long-run average. P is drawn before
    the windows, so one seed gives the same language for every ``n`` and ``context``.
    """
    integer("n", n, 2)
    integer("vocab", vocab, 2)
    integer("context", context, 1)
    number("concentration", concentration, 0.0)
    p = rng.dirichlet(np.full(vocab, float(concentration)), size=vocab)
    pi = markov_stationary(p)
    chains = np.empty((n, context + 1), dtype=np.int64)
    chains[:, 0] = _draw(rng, np.broadcast_to(pi, (n, vocab)))
    for t in range(context):
        chains[:, t + 1] = _draw(rng, p[chains[:, t]])
    info = {
        "transition": torch.as_tensor(p, dtype=torch.float64),
        "stationary": torch.as_tensor(pi, dtype=torch.float64),
        "entropy_rate": markov_entropy_rate(p, pi),
        "vocab_size": vocab,
        "context": context,
        "concentration": float(concentration),
    }
    return chains[:, :-1], chains[:, 1:], vocab, info


def _draw(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw from each row of ``probs`` (m, V), by inverting its cumulative sum."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(probs)) * cdf[:, -1]  # scaled: rows that sum to 1 up to rounding
    return (u[:, None] >= cdf).sum(axis=1)
