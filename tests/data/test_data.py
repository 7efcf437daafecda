"""Tests for ``sgn_lab.data``: built-in tasks, user data from .npz files and CIFAR-10 batches.

Statistical checks on the generated tasks use tolerances derived from the sample size (five
standard errors), with fixed seeds, so they are deterministic. User-data tests write their own
small files under ``tmp_path``; nothing is read from or written to anywhere else.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import socket

import numpy as np
import pytest
import torch

import sgn_lab.data
from sgn_lab.data import (
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    TASKS,
    Task,
    load_cifar10,
    load_npz,
    load_task,
)

# name -> (train, test, input_shape, num_classes) with the default options.
EXPECTED = {
    "digits": (1348, 449, (64,), 10),
    "gaussian-mixture": (1500, 500, (20,), 4),
    "linreg": (1500, 500, (20,), 0),
    "teacher-student": (1500, 500, (20,), 0),
    "mnist1d": (4000, 1000, (40,), 10),
    "markov": (1500, 500, (32,), 16),  # windows of 32 tokens over a vocabulary of 16
}
# Small versions for the seed tests (mnist1d takes ~1 s at its full size).
SMALL = {
    "digits": "digits",
    "gaussian-mixture": "gaussian-mixture:n=200",
    "linreg": "linreg:n=200",
    "teacher-student": "teacher-student:n=200",
    "mnist1d": "mnist1d:num_samples=200",
    "markov": "markov:n=200",
}
FIELDS = ("x_train", "y_train", "x_test", "y_test")


def assert_same(a: Task, b: Task) -> None:
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.num_classes == b.num_classes


class NoNetwork:
    """Stands in for socket.socket.connect: records any attempt to reach the network."""

    def __init__(self) -> None:
        self.attempts: list[object] = []

    def __call__(self, *args: object, **kwargs: object) -> None:
        self.attempts.append(args)
        raise OSError("network access attempted in a test")


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory):
    """Generate MNIST-1D once, from an empty working directory, with the network cut off."""
    # Other tests may have generated it already in this process: generate it here for real.
    sgn_lab.data.tasks._mnist1d_arrays.cache_clear()
    cwd = tmp_path_factory.mktemp("mnist1d_cwd")
    guard = NoNetwork()
    rng_states = (random.getstate(), np.random.get_state())  # noqa: NPY002
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(socket.socket, "connect", guard)
        mp.setattr(socket, "create_connection", guard)
        task = load_task("mnist1d", seed=0)
    after = (random.getstate(), np.random.get_state())  # noqa: NPY002
    return task, cwd, guard, rng_states, after


def get_task(name: str, mnist1d_run) -> Task:
    return mnist1d_run[0] if name == "mnist1d" else load_task(name)


# ------------------------------------------------------------------------------------------
# built-in tasks
# ------------------------------------------------------------------------------------------


def test_tasks_lists_the_built_ins():
    assert set(TASKS) == set(EXPECTED)


@pytest.mark.parametrize("name", TASKS)
def test_built_in_task_shapes_and_dtypes(name, mnist1d_run):
    task = get_task(name, mnist1d_run)
    n_train, n_test, shape, classes = EXPECTED[name]
    assert task.name == name
    assert task.x_train.shape == (n_train, *shape)
    assert task.x_test.shape == (n_test, *shape)
    assert task.input_shape == shape
    assert task.num_classes == classes
    assert task.is_classification == (classes > 0)
    if task.is_sequence:  # token ids in, the next tokens out
        assert task.x_train.dtype == task.y_train.dtype == torch.long
        assert task.y_train.shape == (n_train, *shape) and task.y_test.shape == (n_test, *shape)
        assert torch.equal(task.x_train[:, 1:], task.y_train[:, :-1])
        return
    assert task.x_train.dtype == task.x_test.dtype == torch.float32
    assert torch.isfinite(task.x_train).all() and torch.isfinite(task.x_test).all()
    assert task.y_train.shape == (n_train,) and task.y_test.shape == (n_test,)
    if classes:
        assert task.y_train.dtype == task.y_test.dtype == torch.long
        labels = torch.cat([task.y_train, task.y_test])
        assert labels.min() >= 0 and labels.max() < classes
        assert len(labels.unique()) == classes  # every class occurs
    else:
        assert task.y_train.dtype == task.y_test.dtype == torch.float32
        assert torch.isfinite(task.y_train).all()


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_tensors_different_seed_different_split(name):
    spec = SMALL[name]
    a, b, c = load_task(spec, seed=1), load_task(spec, seed=1), load_task(spec, seed=2)
    assert_same(a, b)
    assert a.x_train.shape == c.x_train.shape
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.x_test, c.x_test)


def test_digits_split_is_a_partition_of_the_same_images():
    a, b = load_task("digits", seed=0), load_task("digits", seed=1)
    rows = {tuple(r) for r in torch.cat([a.x_train, a.x_test]).tolist()}
    assert rows == {tuple(r) for r in torch.cat([b.x_train, b.x_test]).tolist()}
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    image = load_task("digits:image=true")
    assert image.input_shape == (1, 8, 8)
    assert torch.equal(image.x_train.reshape(-1, 64), a.x_train)


def test_linreg_info_matches_the_data():
    dim, condition, sigma = 6, 50.0, 0.3
    task = load_task(
        "linreg", seed=3, n=8000, dim=dim, condition=condition, noise_std=sigma
    )
    x = task.x_train.double()
    n = len(x)
    h, w_star = task.info["H"], task.info["w_star"]
    assert h.shape == (dim, dim) and h.dtype == torch.float64
    assert torch.equal(h, torch.diag(torch.diagonal(h)))  # diagonal
    eig = torch.diagonal(h)
    torch.testing.assert_close(eig.max() / eig.min(), torch.tensor(condition, dtype=h.dtype))
    assert float(eig.max()) == pytest.approx(1.0)
    assert w_star.shape == (dim,) and task.info["noise_std"] == sigma
    # Sample covariance around the known mean 0: Var[x_j²] = 2H_jj², Var[x_j x_k] = H_jj H_kk.
    cov = x.T @ x / n
    for j in range(dim):
        for k in range(dim):
            sd = math.sqrt((2.0 if j == k else 1.0) * float(eig[j] * eig[k]) / n)
            assert abs(float(cov[j, k] - h[j, k])) < 5 * sd, (j, k)
    residual = task.y_train.double() - x @ w_star
    assert abs(float(residual.mean())) < 5 * sigma / math.sqrt(n)
    assert abs(float(residual.std()) - sigma) < 5 * sigma / math.sqrt(2 * n)


def test_linreg_defaults_and_options_from_the_task_string():
    task = load_task("linreg")
    assert task.info["condition"] == 100.0 and task.info["noise_std"] == 0.5
    assert task.info["H"].shape == (20, 20)
    small = load_task("linreg:dim=3,condition=1e3,noise_std=0")
    assert small.input_shape == (3,)
    torch.testing.assert_close(
        torch.diagonal(small.info["H"]), torch.tensor([1.0, 10**-1.5, 1e-3], dtype=torch.float64)
    )
    # No label noise: y = x·w* up to float32 rounding.
    torch.testing.assert_close(
        small.y_train.double(), small.x_train.double() @ small.info["w_star"],
        rtol=1e-5, atol=1e-5,
    )


def test_teacher_student_targets_come_from_the_teacher():
    task = load_task("teacher-student", seed=4, n=400, dim=5, teacher_width=7, teacher_depth=2)
    teacher = task.info["teacher"]
    assert [tuple(w.shape) for w, _ in teacher] == [(7, 5), (7, 7), (1, 7)]
    h = task.x_train.double()
    for i, (w, b) in enumerate(teacher):
        h = h @ w.T + b
        if i < len(teacher) - 1:
            h = torch.tanh(h)
    torch.testing.assert_close(task.y_train.double(), h[:, 0], rtol=1e-5, atol=1e-5)
    assert float(task.y_train.std()) > 0.1  # not a constant target
    noisy = load_task("teacher-student", seed=4, n=4000, label_noise=0.2)
    clean = load_task("teacher-student", seed=4, n=4000)
    # Same seed: same inputs and teacher, only the noise is added (drawn last).
    assert torch.equal(noisy.x_train, clean.x_train)
    noise = (noisy.y_train - clean.y_train).double()
    n = len(noise)
    assert abs(float(noise.std()) - 0.2) < 5 * 0.2 / math.sqrt(2 * n)
    assert noisy.info["label_noise"] == 0.2


def test_gaussian_mixture_centres_match_the_class_means():
    task = load_task("gaussian-mixture", seed=5, n=4000, dim=3, classes=3, separation=2.0)
    centres = task.info["centres"]
    assert centres.shape == (3, 3)
    for c in range(3):
        points = task.x_train[task.y_train == c].double()
        err = (points.mean(0) - centres[c]).abs().max()
        assert float(err) < 5 / math.sqrt(len(points))


def test_mnist1d_generates_offline_without_writing_files(mnist1d_run):
    task, cwd, guard, before, after = mnist1d_run
    assert guard.attempts == []
    assert list(cwd.iterdir()) == []
    assert not os.path.exists(cwd / "mnist1d_data.pkl")
    # make_dataset reseeds numpy's and Python's global generators; load_task restores them.
    assert before[0] == after[0]
    assert all(np.array_equal(u, v) for u, v in zip(before[1], after[1], strict=True))
    assert task.info["generator_seed"] == 0
    assert float(task.x_train.std()) == pytest.approx(1.0, abs=0.05)  # standardised by mnist1d


def test_mnist1d_is_the_packages_data_split_by_us():
    from mnist1d.data import get_dataset_args, make_dataset

    task = load_task("mnist1d:num_samples=100", seed=9)
    args = get_dataset_args()
    args.seed, args.num_samples = 9, 100
    state = np.random.get_state()  # noqa: NPY002
    data = make_dataset(args)
    np.random.set_state(state)  # noqa: NPY002
    ours = torch.cat([task.x_train, task.x_test]).double().numpy()
    theirs = np.concatenate([data["x"], data["x_test"]]).astype(np.float32).astype(np.float64)
    labels = torch.cat([task.y_train, task.y_test]).numpy()
    their_labels = np.concatenate([data["y"], data["y_test"]])
    order, their_order = np.lexsort(ours.T[::-1]), np.lexsort(theirs.T[::-1])
    np.testing.assert_array_equal(ours[order], theirs[their_order])
    np.testing.assert_array_equal(labels[order], their_labels[their_order])
    assert (len(task.x_train), len(task.x_test)) == (80, 20)


def test_mnist1d_is_made_once_per_process_and_callers_cannot_change_it():
    first = load_task("mnist1d:num_samples=100", seed=9)
    first.x_train.zero_()
    again = load_task("mnist1d:num_samples=100", seed=9)
    assert float(again.x_train.abs().sum()) > 0
    assert sgn_lab.data.tasks._mnist1d_arrays.cache_info().hits >= 1
    other = load_task("mnist1d:num_samples=100", seed=10)
    assert not torch.equal(other.x_train, again.x_train)


def test_n_train_and_n_test_take_seeded_nested_subsets():
    full = load_task("gaussian-mixture", seed=2)
    small = load_task("gaussian-mixture", seed=2, n_train=50, n_test=20)
    smaller = load_task("gaussian-mixture", seed=2, n_train=10, n_test=20)
    assert small.x_train.shape == (50, 20) and small.x_test.shape == (20, 20)
    assert torch.equal(small.x_train[:10], smaller.x_train)  # nested under one seed
    full_rows = {tuple(r) for r in full.x_train.tolist()}
    assert all(tuple(r) in full_rows for r in small.x_train.tolist())
    assert_same(small, load_task("gaussian-mixture", seed=2, n_train=50, n_test=20))
    other = load_task("gaussian-mixture", seed=2, test_fraction=0.5)
    assert (len(other.x_train), len(other.x_test)) == (1000, 1000)


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("nope", {}, "unknown task 'nope'"),
        ("linreg", {"dims": 3}, r"unknown option\(s\) \['dims'\] for task 'linreg'"),
        ("linreg:dims=3", {}, r"unknown option\(s\) \['dims'\]"),
        ("linreg:dim", {}, "bad option 'dim' in task 'linreg:dim'"),
        ("linreg:dim=3,dim=4", {}, "option 'dim' given twice"),
        ("linreg:dim=3", {"dim": 4}, r"\['dim'\] given both"),
        ("linreg", {"dim": 0}, "dim must be an integer >= 1, got 0"),
        ("linreg", {"dim": 2.5}, "dim must be an integer >= 1, got 2.5"),
        ("linreg", {"condition": 0.5}, "condition must be a finite number >= 1.0, got 0.5"),
        ("linreg", {"noise_std": -1}, "noise_std must be a finite number >= 0.0, got -1"),
        ("digits:image=yes", {}, "image must be true or false, got 'yes'"),
        ("mnist1d", {"num_samples": 5}, "num_samples must be an integer >= 20, got 5"),
        ("linreg", {"test_fraction": 1.5}, r"test_fraction must lie in \(0, 1\), got 1.5"),
        ("linreg", {"seed": -1}, "seed must be an integer in"),
        ("linreg", {"n_train": 0}, "n_train must be an integer >= 1, got 0"),
        ("linreg", {"n_train": 1501}, "n_train=1501 exceeds the 1500 samples"),
        ("linreg", {"n_test": 501}, "n_test=501 exceeds the 500 samples"),
        ("linreg:n=3", {"test_fraction": 0.1}, "leaves 0 test and 3 training samples"),
        ("npz:", {}, "task 'npz:' needs a path"),
        ("cifar10", {}, "task 'cifar10' needs a path"),
    ],
)
def test_bad_task_arguments_name_the_value(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_task(spec, **kwargs)


def test_unknown_task_message_lists_the_tasks_on_one_line():
    # As an unknown model does: every built-in task and file task, and the user's own form.
    from sgn_lab.data.catalog import FILE_TASKS, TASKS

    with pytest.raises(ValueError) as info:
        load_task("nope")
    said = str(info.value)
    assert "\n" not in said and said.startswith("unknown task 'nope'; choose one of ")
    assert all(name in said for name in (*TASKS, *FILE_TASKS, "pkg.module:function"))


# ------------------------------------------------------------------------------------------
# .npz files
# ------------------------------------------------------------------------------------------


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_with_test_set_and_integer_labels(tmp_path):
    rng = np.random.default_rng(0)
    x, x_test = rng.standard_normal((30, 2, 3)), rng.standard_normal((7, 2, 3))
    y, y_test = rng.integers(0, 3, 30), np.array([0, 1, 2, 3, 4, 0, 1], dtype=np.int32)
    path = write_npz(tmp_path / "d.npz", x=x, y=y, x_test=x_test, y_test=y_test, extra=[1])
    task = load_npz(path)
    assert task.name == f"npz:{path}"
    assert task.num_classes == 5  # max over y and y_test, + 1
    assert task.input_shape == (2, 3)
    assert task.x_train.dtype == torch.float32 and task.y_train.dtype == torch.long
    np.testing.assert_array_equal(task.x_train.numpy(), x.astype(np.float32))  # file order
    np.testing.assert_array_equal(task.y_test.numpy(), y_test)
    np.testing.assert_array_equal(task.x_test.numpy(), x_test.astype(np.float32))
    assert task.info == {"path": str(path), "split": "file"}
    assert_same(load_task(f"npz:{path}"), task)
    sub = load_task(f"npz:{path}", n_train=5, n_test=3, seed=1)
    assert (len(sub.x_train), len(sub.x_test)) == (5, 3)
    with pytest.raises(ValueError, match="has its own test set.*test_fraction=0.5"):
        load_npz(path, test_fraction=0.5)


@pytest.mark.parametrize("y_shape", [(40,), (40, 1)])
def test_npz_without_test_set_float_labels_is_a_seeded_regression_split(tmp_path, y_shape):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((40, 4)), rng.standard_normal(y_shape).astype(np.float32)
    path = write_npz(tmp_path / "r.npz", x=x, y=y)
    task = load_npz(path, seed=3)
    assert task.num_classes == 0 and not task.is_classification
    assert (len(task.x_train), len(task.x_test)) == (30, 10)
    assert task.y_train.dtype == torch.float32 and task.y_train.shape == (30,)
    assert task.info["split"] == "seeded"
    # The split is a partition of the file's rows, with each y still next to its x.
    xs = torch.cat([task.x_train, task.x_test]).numpy()
    ys = torch.cat([task.y_train, task.y_test]).numpy()
    order = np.argsort(xs[:, 0])
    expected = np.argsort(x[:, 0].astype(np.float32))
    np.testing.assert_array_equal(xs[order], x.astype(np.float32)[expected])
    np.testing.assert_array_equal(ys[order], y.reshape(-1)[expected])
    assert_same(task, load_npz(path, seed=3))
    other = load_npz(path, seed=4)
    assert not torch.equal(task.x_test, other.x_test)
    half = load_task(f"npz:{path}", seed=3, test_fraction=0.5)
    assert (len(half.x_train), len(half.x_test)) == (20, 20)


def test_npz_missing_file_names_the_path(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_npz(path)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_task(f"npz:{path}")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 2))}, r"missing key\(s\) \['y'\]"),
        ({"y": np.zeros(4)}, r"missing key\(s\) \['x'\]"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(5)}, "'x' has 4 samples but 'y' has 5"),
        (
            {"x": np.zeros((4, 2)), "y": np.zeros(4), "x_test": np.zeros((3, 2)),
             "y_test": np.zeros(2)},
            "'x_test' has 3 samples but 'y_test' has 2",
        ),
        (
            {"x": np.zeros((4, 2)), "y": np.zeros(4), "x_test": np.zeros((3, 5)),
             "y_test": np.zeros(3)},
            r"x_test has sample shape \(5,\) but x has \(2,\)",
        ),
        (
            {"x": np.zeros((4, 2)), "y": np.zeros(4), "x_test": np.zeros((3, 2))},
            "'x_test' is given without 'y_test'",
        ),
        (
            {"x": np.zeros((4, 2)), "y": np.zeros(4, dtype=int), "x_test": np.zeros((3, 2)),
             "y_test": np.zeros(3)},
            "y has dtype int64 but y_test has float64",
        ),
        ({"x": np.array([[0.0], [np.nan], [1.0]]), "y": np.zeros(3)}, "'x' has non-finite"),
        ({"x": np.zeros((3, 1)), "y": np.array([0, np.inf, 1])}, "'y' has non-finite"),
        ({"x": np.zeros((3, 1)), "y": np.array([0, -1, 1])}, "negative class label -1"),
        ({"x": np.zeros(3), "y": np.zeros(3)}, r"'x' must have shape \(n, features...\)"),
        ({"x": np.zeros((3, 1)), "y": np.zeros((3, 2))}, r"'y' must have shape \(n,\)"),
        ({"x": np.array([["a"], ["b"]]), "y": np.zeros(2)}, "'x' must be real numbers"),
    ],
)
def test_npz_bad_contents_name_the_key(tmp_path, arrays, message):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_npz(path)
    assert "bad.npz" in str(info.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "npy", "pickled", "empty"])
def test_npz_corrupt_file_is_a_value_error_naming_it(tmp_path, kind):
    path = tmp_path / "broken.npz"
    if kind == "garbage":
        path.write_bytes(b"this is not a zip archive \x00\x01\x02" * 10)
    elif kind == "truncated":
        write_npz(path, x=np.zeros((100, 5)), y=np.zeros(100))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "pickled":
        write_npz(path, x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3))
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read .*broken.npz.* as an .npz archive") as info:
        load_npz(path)
    # No zipfile/pickle traceback chained to it: the message is the whole story.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


# ------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# ------------------------------------------------------------------------------------------

PER_BATCH = 10


def write_cifar(folder, seed=0):
    """A fake CIFAR-10 folder in the real format: 5 training batches and a test batch."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for i, name in enumerate((*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)):
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, PER_BATCH)]
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img{i}_{j}.png".encode() for j in range(PER_BATCH)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = (data, labels)
    return batches


def test_cifar10_pixels_and_labels_map_exactly(tmp_path):
    batches = write_cifar(tmp_path / "c")
    task = load_cifar10(tmp_path / "c")
    assert task.x_train.shape == (5 * PER_BATCH, 3, 32, 32)
    assert task.x_test.shape == (PER_BATCH, 3, 32, 32)
    assert task.x_train.dtype == torch.float32 and task.y_train.dtype == torch.long
    assert task.num_classes == 10 and task.input_shape == (3, 32, 32)
    assert 0.0 <= float(task.x_train.min()) and float(task.x_train.max()) <= 1.0
    train_data = np.concatenate([batches[n][0] for n in CIFAR10_TRAIN_FILES])
    train_labels = sum((batches[n][1] for n in CIFAR10_TRAIN_FILES), [])
    assert task.y_train.tolist() == train_labels
    assert task.y_test.tolist() == batches[CIFAR10_TEST_FILE][1]
    # Row layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32×32 image.
    for x, data, i in [(task.x_train, train_data, 0), (task.x_train, train_data, 37),
                       (task.x_test, batches[CIFAR10_TEST_FILE][0], 9)]:
        for c in range(3):
            for r in range(32):
                for k in range(32):
                    assert x[i, c, r, k].item() == np.float32(data[i, 1024 * c + 32 * r + k]) / 255
    values = (task.x_train * 255).round().to(torch.uint8).reshape(len(train_data), -1)
    np.testing.assert_array_equal(values.numpy(), train_data)


def test_cifar10_standardize_uses_training_statistics(tmp_path):
    write_cifar(tmp_path / "c")
    raw = load_cifar10(tmp_path / "c")
    std = load_cifar10(tmp_path / "c", standardize=True)
    x = std.x_train.double()
    zeros, ones = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), zeros, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        x.std(dim=(0, 2, 3), correction=0), ones, atol=1e-5, rtol=0
    )
    mean = torch.tensor(std.info["mean"]).view(1, 3, 1, 1)
    sd = torch.tensor(std.info["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(
        std.x_test.double() * sd + mean, raw.x_test.double(), atol=1e-6, rtol=0
    )
    # The constants do not depend on the subsample.
    small = load_cifar10(tmp_path / "c", standardize=True, n_train=5, seed=1)
    assert small.info["mean"] == std.info["mean"]


def test_cifar10_task_string_subsampling_and_nested_folder(tmp_path):
    write_cifar(tmp_path / "top" / "cifar-10-batches-py")
    task = load_task(f"cifar10:{tmp_path / 'top'}", n_train=7, n_test=3, seed=2)
    assert task.x_train.shape == (7, 3, 32, 32) and task.x_test.shape == (3, 3, 32, 32)
    assert task.info["folder"] == str(tmp_path / "top" / "cifar-10-batches-py")
    assert_same(task, load_task(f"cifar10:{tmp_path / 'top'}", n_train=7, n_test=3, seed=2))
    full = load_cifar10(tmp_path / "top")
    rows = {tuple(r) for r in full.x_train.reshape(len(full.x_train), -1)[:, :8].tolist()}
    assert all(tuple(r) in rows for r in task.x_train.reshape(7, -1)[:, :8].tolist())
    with pytest.raises(ValueError, match="fixed test set; test_fraction=0.5"):
        load_task(f"cifar10:{tmp_path / 'top'}", test_fraction=0.5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['normalize'\]"):
        load_task(f"cifar10:{tmp_path / 'top'}", normalize=True)


def test_cifar10_missing_folder_and_batches_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-10 folder not found: .*nowhere"):
        load_cifar10(tmp_path / "nowhere")
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    (tmp_path / "c" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['data_batch_3', 'test_batch'\] missing"):
        load_cifar10(tmp_path / "c")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"garbage bytes, not a pickle", "cannot read .*data_batch_2.* as a CIFAR-10 python batch"),
        (pickle.dumps([1, 2, 3]), "data_batch_2.* is not a CIFAR-10 python batch"),
        (
            pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
            r"data_batch_2.*b'data' must be uint8 of shape \(N, 3072\)",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
            r"data_batch_2.*labels outside 0..9",
        ),
    ],
)
def test_cifar10_corrupt_batch_is_named(tmp_path, content, message):
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_2").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_cifar10(tmp_path / "c")


def test_file_task_options_of_the_catalog_are_the_loaders_keywords():
    from sgn_lab.data.catalog import FILE_TASK_OPTIONS, FILE_TASKS
    from sgn_lab.data.tasks import file_task_options

    assert set(FILE_TASK_OPTIONS) == set(FILE_TASKS)
    for kind in FILE_TASKS:
        assert list(FILE_TASK_OPTIONS[kind]) == file_task_options(kind), kind
