"""Tests for the language tasks: ``text:PATH`` files and the synthetic ``markov`` language.

References are independent of sgn_lab: windows are cut from the file's bytes or characters by
plain Python slicing, and the Markov chain's stationary distribution comes from an
eigenvector of Pᵀ (``numpy.linalg.eig``), where the library solves a linear system.
Statistical checks use fixed seeds and tolerances derived from the counts (five standard
errors), so they are deterministic and far from flaky.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch

from sgn_lab.data import Task, load_task, load_text, markov_entropy_rate, markov_stationary
from sgn_lab.models.losses import token_cross_entropy
from tests.helpers import rejects

# Letters, digits, space and newline, plus 2-, 3- and 4-byte UTF-8 characters.
ALPHABET = "abcdefghij 0123\nüé—✓€漢🙂"


def random_text(length: int, seed: int) -> str:
    """Seeded random text: long windows of it are distinct, so a window names its position."""
    rng = random.Random(seed)
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def write_text(tmp_path, text: str, name: str = "corpus.txt"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def reference_windows(tokens: list, context: int) -> list[tuple[tuple, tuple]]:
    """(x, y) of every window by slicing: x = tokens[s:s+T], y = tokens[s+1:s+T+1]."""
    n = (len(tokens) - 1) // context
    return [
        (tuple(tokens[s : s + context]), tuple(tokens[s + 1 : s + context + 1]))
        for s in range(0, n * context, context)
    ]


def pairs(x: torch.Tensor, y: torch.Tensor) -> list[tuple[tuple, tuple]]:
    return [(tuple(a), tuple(b)) for a, b in zip(x.tolist(), y.tolist(), strict=True)]


def all_pairs(task: Task) -> list[tuple[tuple, tuple]]:
    return pairs(task.x_train, task.y_train) + pairs(task.x_test, task.y_test)


def assert_same(a: Task, b: Task) -> None:
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


# ------------------------------------------------------------------------------------------
# text:PATH
# ------------------------------------------------------------------------------------------


def test_byte_windows_are_slices_of_the_utf8_bytes(tmp_path):
    text = random_text(700, seed=0)
    data = text.encode("utf-8")
    assert len(data) > len(text)  # multi-byte characters are present
    path = write_text(tmp_path, text)
    task = load_text(path, context=16)
    want = reference_windows(list(data), 16)
    assert len(set(want)) == len(want)  # distinct windows: equality of sets is a partition
    got = all_pairs(task)
    assert sorted(got) == sorted(want)
    assert len(task.x_test) == round(0.25 * len(want))
    for tensor in (task.x_train, task.y_train, task.x_test, task.y_test):
        assert tensor.dtype == torch.long and tensor.shape[1:] == (16,)
    assert task.num_classes == task.info["vocab_size"] == 256
    assert task.input_shape == (16,)
    assert max(max(x) for x, _ in got) >= 0x80  # the bytes of non-ASCII characters
    assert task.info == {
        "path": str(path), "tokens": "byte", "context": 16, "vocab": None, "vocab_size": 256,
    }
    assert task.name == f"text:{path}"


def test_char_windows_map_back_to_the_text(tmp_path):
    text = random_text(500, seed=1)
    path = write_text(tmp_path, text)
    task = load_text(path, context=12, tokens="char")
    vocab = task.info["vocab"]
    assert vocab == sorted(set(text), key=ord)
    assert task.num_classes == task.info["vocab_size"] == len(vocab) == len(set(ALPHABET))
    # Decoding every window gives back the text's own character slices, windows by characters
    # (not bytes): the count follows len(text), not len(text.encode()).
    decoded = [
        ("".join(vocab[i] for i in x), "".join(vocab[i] for i in y)) for x, y in all_pairs(task)
    ]
    want = [("".join(x), "".join(y)) for x, y in reference_windows(list(text), 12)]
    assert len(decoded) == (len(text) - 1) // 12
    assert sorted(decoded) == sorted(want)
    # And encoding with the vocabulary reproduces the tensors exactly.
    index = {c: i for i, c in enumerate(vocab)}
    assert sorted(all_pairs(task)) == sorted(
        (tuple(index[c] for c in x), tuple(index[c] for c in y)) for x, y in want
    )


def test_non_ascii_file_in_byte_and_char_modes(tmp_path):
    text = "Grüße, 漢字 and 🙂! " * 3  # 2-, 3- and 4-byte characters
    path = write_text(tmp_path, text)
    data = text.encode("utf-8")
    by_byte = load_text(path, context=4, test_fraction=0.5)
    by_char = load_text(path, context=4, tokens="char", test_fraction=0.5)
    assert sorted(all_pairs(by_byte)) == sorted(reference_windows(list(data), 4))
    assert len(by_byte.x_train) + len(by_byte.x_test) == (len(data) - 1) // 4
    vocab = by_char.info["vocab"]
    assert vocab == sorted(set(text))
    assert "🙂" in vocab and "ü" in vocab
    index = {c: i for i, c in enumerate(vocab)}
    want = reference_windows([index[c] for c in text], 4)
    assert sorted(all_pairs(by_char)) == sorted(want)
    assert len(want) == (len(text) - 1) // 4


def test_text_seeds_split_and_subsets(tmp_path):
    path = write_text(tmp_path, random_text(900, seed=2))
    a, b, c = load_text(path, seed=5), load_text(path, seed=5), load_text(path, seed=6)
    assert_same(a, b)
    assert not torch.equal(a.x_train, c.x_train)
    train, test = set(pairs(a.x_train, a.y_train)), set(pairs(a.x_test, a.y_test))
    assert not train & test
    assert train | test == set(all_pairs(c))  # every window, whatever the seed
    small = load_text(path, seed=5, n_train=4, n_test=3)
    assert small.x_train.shape == (4, 64) and small.x_test.shape == (3, 64)
    assert set(pairs(small.x_train, small.y_train)) <= train
    assert set(pairs(small.x_test, small.y_test)) <= test


def test_text_task_string_with_colon_and_comma_in_the_path(tmp_path):
    text = random_text(200, seed=3)
    path = write_text(tmp_path, text, name="a:b,context=3.txt")
    task = load_task(f"text:{path}", seed=0, context=16, tokens="char")
    assert task.name == f"text:{path}" and task.info["context"] == 16
    assert_same(task, load_text(path, seed=0, context=16, tokens="char"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokens": "word"}, rejects("tokens", "'word'")),
        ({"tokens": None}, rejects("tokens", "None")),
        ({"context": 0}, rejects("context", "0")),
        ({"context": 2.5}, rejects("context", "2.5")),
        ({"context": True}, rejects("context", "True")),
        ({"context": 15}, r"has 30 byte tokens: too short for 2 windows of context=15 "
                          r"\(needs at least 31\)"),
        ({"context": 14, "tokens": "char"}, r"has 28 char tokens: too short .* context=14"),
        ({"test_fraction": 1.0}, rejects("test_fraction", "1.0")),
        ({"context": 4, "n_train": 99}, r"n_train=99 exceeds the 5 samples"),
    ],
)
def test_bad_text_options_name_the_value(tmp_path, kwargs, message):
    path = write_text(tmp_path, "0123456789ü" * 2 + "abcdef")  # 30 bytes, 28 characters
    with pytest.raises(ValueError, match=message):
        load_text(path, **kwargs)


def test_bad_text_files_are_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"text file not found: '{missing}'")):
        load_task(f"text:{missing}")
    with pytest.raises(ValueError, match="is a folder"):
        load_text(tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("abc déf".encode("latin-1") + b" " * 200)
    with pytest.raises(ValueError, match=r"latin1.txt' is not UTF-8 text: invalid byte 0xe9 at "
                                         r"byte offset 5$"):
        load_text(latin1, context=4)
    empty = write_text(tmp_path, "", name="empty.txt")
    with pytest.raises(ValueError, match="has 0 byte tokens: too short for 2 windows"):
        load_text(empty)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['vocab'\] for 'text' tasks"):
        load_task(f"text:{empty}", vocab=3)
    with pytest.raises(ValueError, match="task 'text:' needs a path"):
        load_task("text:")


# ------------------------------------------------------------------------------------------
# markov
# ------------------------------------------------------------------------------------------


def eig_stationary(p: np.ndarray) -> np.ndarray:
    """Reference π: the eigenvector of Pᵀ for the eigenvalue closest to 1, normalised."""
    values, vectors = np.linalg.eig(p.T)
    v = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    return v / v.sum()


def reference_entropy_rate(p: np.ndarray) -> float:
    pi = eig_stationary(p)
    return float(-sum(
        pi[i] * sum(p[i, j] * math.log(p[i, j]) for j in range(len(p)) if p[i, j] > 0)
        for i in range(len(p))
    ))


def window_losses(p: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-window mean of −log P[x_t, x_{t+1}], (n,)."""
    return -np.log(p[x.numpy(), y.numpy()]).mean(axis=1)


def clt_bound(per_window: np.ndarray) -> float:
    # The windows are independent chains, so their mean losses are i.i.d.: the standard error
    # of the overall mean is exactly std(window means)/√n, with the correlation between tokens
    # of one window already inside each window's mean. (Tokens of one window are correlated
    # through the chain, so the std over single tokens /√(nT) would understate it.) Five
    # standard errors.
    return 5 * float(per_window.std(ddof=1)) / math.sqrt(len(per_window))


@pytest.fixture(scope="module")
def markov_task() -> Task:
    return load_task("markov:n=3000,vocab=6,context=20,concentration=0.7", seed=11)


def test_markov_info_matches_an_eigenvector_reference(markov_task):
    info = markov_task.info
    p = info["transition"].numpy()
    assert info["transition"].dtype == info["stationary"].dtype == torch.float64
    assert p.shape == (6, 6) and info["vocab_size"] == markov_task.num_classes == 6
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(info["stationary"].numpy(), eig_stationary(p), atol=1e-10)
    assert info["entropy_rate"] == pytest.approx(reference_entropy_rate(p), rel=1e-10)
    assert 0 < info["entropy_rate"] < math.log(6)
    assert markov_entropy_rate(p, markov_stationary(p)) == info["entropy_rate"]
    for tensor in (markov_task.x_train, markov_task.y_train):
        assert tensor.dtype == torch.long and tensor.shape == (2250, 20)
    # Targets are the inputs shifted by one token.
    assert torch.equal(markov_task.x_train[:, 1:], markov_task.y_train[:, :-1])


def test_markov_transition_frequencies_match_p(markov_task):
    p = markov_task.info["transition"].numpy()
    x = torch.cat([markov_task.x_train, markov_task.x_test]).numpy()
    y = torch.cat([markov_task.y_train, markov_task.y_test]).numpy()
    counts = np.zeros_like(p)
    np.add.at(counts, (x.ravel(), y.ravel()), 1)
    for i in range(len(p)):
        n_i = counts[i].sum()
        assert n_i > 100
        # Given n_i visits to i, the successors are n_i i.i.d. draws from row P_i (Markov
        # property): each frequency is binomial with std √(P_ij(1−P_ij)/n_i). One count of
        # slack covers entries so small that the normal approximation fails.
        sd = np.sqrt(p[i] * (1 - p[i]) / n_i)
        assert np.all(np.abs(counts[i] / n_i - p[i]) < 5 * sd + 1 / n_i), i


@pytest.mark.parametrize("position", [0, -1])
def test_markov_windows_are_stationary(markov_task, position):
    # First and last input token of each window: one draw per (independent) window, so the
    # frequencies are multinomial around π if every window starts, and stays, at π.
    pi = markov_task.info["stationary"].numpy()
    tokens = torch.cat([markov_task.x_train, markov_task.x_test])[:, position].numpy()
    n = len(tokens)
    freq = np.bincount(tokens, minlength=len(pi)) / n
    assert np.all(np.abs(freq - pi) < 5 * np.sqrt(pi * (1 - pi) / n) + 1 / n)


def test_markov_mean_log_loss_is_the_entropy_rate(markov_task):
    p = markov_task.info["transition"].numpy()
    losses = window_losses(
        p, torch.cat([markov_task.x_train, markov_task.x_test]),
        torch.cat([markov_task.y_train, markov_task.y_test]),
    )
    assert abs(losses.mean() - markov_task.info["entropy_rate"]) < clt_bound(losses)


def test_token_cross_entropy_of_the_true_chain_is_the_entropy_rate(markov_task):
    p = torch.as_tensor(markov_task.info["transition"])
    x, y = markov_task.x_test, markov_task.y_test
    h = markov_task.info["entropy_rate"]
    bound = clt_bound(window_losses(p.numpy(), x, y))
    true_loss = float(token_cross_entropy(torch.log(p)[x], y))
    assert abs(true_loss - h) < bound
    # Any other model pays H + Σ_i π_i KL(P_i ‖ Q_i) in expectation: H is the floor.
    q = (p + 0.2) / (p + 0.2).sum(dim=1, keepdim=True)
    pi = markov_task.info["stationary"]
    expected = h + float(pi @ (p * torch.log(p / q)).sum(dim=1))
    other_loss = float(token_cross_entropy(torch.log(q)[x], y))
    assert expected > h + 5 * bound  # far enough above the floor to tell apart
    assert abs(other_loss - expected) < clt_bound(window_losses(q.numpy(), x, y))


def test_markov_seeds_and_options():
    a, b = load_task("markov:n=200", seed=1), load_task("markov", seed=1, n=200)
    c = load_task("markov:n=200", seed=2)
    assert_same(a, b)
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.info["transition"], c.info["transition"])
    # P is drawn before the windows: more windows, same language.
    more = load_task("markov:n=400,context=5", seed=1)
    assert torch.equal(more.info["transition"], a.info["transition"])
    # A small concentration gives a more predictable language.
    low = load_task("markov:n=20,concentration=0.05", seed=1).info["entropy_rate"]
    high = load_task("markov:n=20,concentration=50", seed=1).info["entropy_rate"]
    assert low < 0.5 * math.log(16) < high < math.log(16)


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("markov:vocab=1", {}, rejects("vocab", "1")),
        ("markov", {"context": 0}, rejects("context", "0")),
        ("markov", {"n": 1}, rejects("n", "1")),
        ("markov", {"concentration": 0}, rejects("concentration", "0")),
        ("markov:concentration=-1", {}, rejects("concentration", "-1")),
        ("markov", {"tokens": "char"}, r"unknown option\(s\) \['tokens'\] for task 'markov'"),
    ],
)
def test_bad_markov_options_name_the_value(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_task(spec, **kwargs)


def test_markov_helpers_reject_a_non_stochastic_matrix():
    with pytest.raises(ValueError, match="transition must be a square matrix, got shape"):
        markov_stationary(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="rows that sum to 1"):
        markov_stationary(np.ones((2, 2)))
    with pytest.raises(ValueError, match="no unique stationary distribution"):
        markov_stationary(np.eye(3))  # three closed classes


# ------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------


def test_language_tasks_are_sequences_with_the_token_loss(tmp_path):
    path = write_text(tmp_path, random_text(300, seed=4))
    for task in (load_task("markov", seed=0), load_task(f"text:{path}", seed=0, context=16)):
        assert task.is_sequence
        assert task.loss_fn is token_cross_entropy
        assert task.x_train.shape == task.y_train.shape and task.x_train.dim() == 2
        # The loss of a batch is the mean of its windows' losses, as for the training step.
        logits = torch.randn(*task.x_test[:5].shape, task.num_classes, dtype=torch.float64)
        per_window = torch.stack([
            task.loss_fn(logits[i : i + 1], task.y_test[i : i + 1]) for i in range(5)
        ])
        torch.testing.assert_close(task.loss_fn(logits, task.y_test[:5]), per_window.mean())
    markov = load_task("markov", seed=0)
    assert (len(markov.x_train), len(markov.x_test)) == (1500, 500)
    assert markov.input_shape == (32,) and markov.num_classes == 16
    assert set(markov.info) == {
        "transition", "stationary", "entropy_rate", "vocab_size", "context", "concentration",
    }
