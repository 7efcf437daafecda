"""User data from local files: ``npz:PATH`` and ``cifar10:FOLDER``."""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sgn_lab.checks import boolean, fraction, seed_value
from sgn_lab.data.split import DEFAULT_TEST_FRACTION, Task, assemble_task

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


def load_npz(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    test_fraction: float | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Task:
    """Load a task from a NumPy ``.npz`` archive (as written by ``np.savez``).

    The archive holds ``x`` (n, ...) and ``y`` (n,), and optionally ``x_test`` and ``y_test``
    (both or neither). Without them, a seeded random ``test_fraction`` of the samples
    (default 0.25) is held out. Integer (or bool) ``y`` means classification with
    ``num_classes = max label + 1`` (labels must be >= 0); floating ``y`` means regression
    (shape (n,) or (n, 1)). Inputs are converted to float32 as they are (no scaling). Other
    keys are ignored. Object arrays are refused: the file is read with ``allow_pickle=False``.

    Parameters
    ----------
    path
        The ``.npz`` file. As a task string: ``npz:PATH``.
    seed, test_fraction, n_train, n_test
        As in :func:`load_task`. ``test_fraction`` must be ``None`` when the file has
        ``x_test``.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        A corrupt or non-.npz file, a missing key, mismatched lengths or shapes, non-finite
        values, negative labels; the message names the file and the key.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"npz file not found: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not an .npz file")
    seed = seed_value("seed", seed)
    arrays = _read_npz(path)
    where = f"in {str(path)!r}"
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(f"missing key(s) {missing} {where}; it has {sorted(arrays)}")
    has_test = [k for k in ("x_test", "y_test") if k in arrays]
    if len(has_test) == 1:
        other = "y_test" if has_test[0] == "x_test" else "x_test"
        raise ValueError(
            f"{where}: {has_test[0]!r} is given without {other!r}; give both or neither"
        )

    x, y = arrays["x"], arrays["y"]
    classification = _is_integer(y)
    _check_inputs("x", x, where)
    y = _check_targets("y", y, len(x), classification, where)
    x_test = y_test = None
    if has_test:
        if test_fraction is not None:
            raise ValueError(
                f"{where}: the file has its own test set (x_test, y_test); "
                f"test_fraction={test_fraction!r} does not apply"
            )
        x_test, y_test = arrays["x_test"], arrays["y_test"]
        _check_inputs("x_test", x_test, where)
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"{where}: x_test has sample shape {x_test.shape[1:]} but x has {x.shape[1:]}"
            )
        if _is_integer(y_test) != classification:
            raise ValueError(
                f"{where}: y has dtype {y.dtype} but y_test has {y_test.dtype}; both must be "
                "integer (classification) or both floating (regression)"
            )
        y_test = _check_targets("y_test", y_test, len(x_test), classification, where)
    classes = 0
    if classification:
        labels = y if y_test is None else np.concatenate([y, y_test])
        classes = int(labels.max()) + 1
    if test_fraction is None:
        test_fraction = DEFAULT_TEST_FRACTION
    fraction("test_fraction", test_fraction)
    info = {"path": str(path), "split": "file" if has_test else "seeded"}
    return assemble_task(
        f"npz:{path}", x, y, classes, info, rng=np.random.default_rng(seed),
        test_fraction=test_fraction, n_train=n_train, n_test=n_test, x_test=x_test,
        y_test=y_test,
    )


def load_cifar10(
    folder: str | os.PathLike[str],
    *,
    standardize: bool = False,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
) -> Task:
    """Load CIFAR-10 from its *python* batches in a local folder (nothing is downloaded).

    The folder (or its subfolder ``cifar-10-batches-py``, as the official archive unpacks)
    holds ``data_batch_1`` … ``data_batch_5`` (50 000 training images) and ``test_batch``
    (10 000). Each is a pickled dict with ``b"data"``, a uint8 array (N, 3072) whose rows are
    1024 red, then 1024 green, then 1024 blue values, each a row-major 32×32 image, and
    ``b"labels"``, N integers in 0..9 (names in :data:`CIFAR10_CLASSES`).

    Inputs come out as float32 (N, 3, 32, 32) with ``x[i, c, r, k] = data[i, 1024c + 32r + k]
    / 255`` in [0, 1]; with ``standardize=True`` each channel c is then mapped to
    ``(x - mean_c) / std_c``, mean and standard deviation over all pixels of all 50 000
    training images (the same constants for the test set, whatever ``n_train``). Labels are
    int64. Subsampling (``n_train``, ``n_test``) happens before the conversion to float, so a
    small run never holds the full float data set.

    The batches are pickles: load only files from a source you trust.

    Parameters
    ----------
    folder
        The folder. As a task string: ``cifar10:FOLDER``.
    standardize
        Standardise each channel as above.
    seed, n_train, n_test
        As in :func:`load_task`.

    Raises
    ------
    FileNotFoundError
        The folder or any of the six batch files is missing (the message lists them).
    ValueError
        A file that is not a CIFAR-10 python batch (the message names it).
    """
    boolean("standardize", standardize)
    seed = seed_value("seed", seed)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder not found: {str(root)!r}")
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    nested = root / "cifar-10-batches-py"
    if not (root / names[0]).exists() and (nested / names[0]).exists():
        root = nested
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batch file(s) {missing} missing in {str(root)!r}")
    batches = [_read_cifar_batch(root / n) for n in CIFAR10_TRAIN_FILES]
    x_train = np.concatenate([b[0] for b in batches])
    y_train = np.concatenate([b[1] for b in batches])
    x_test, y_test = _read_cifar_batch(root / CIFAR10_TEST_FILE)

    # Per-channel statistics from value counts: exact, and no float copy of all 50 000 images.
    mean = np.empty(3)
    std = np.empty(3)
    values = np.arange(256) / 255.0
    for c in range(3):
        counts = np.bincount(x_train[:, 1024 * c : 1024 * (c + 1)].ravel(), minlength=256)
        mean[c] = counts @ values / counts.sum()
        std[c] = math.sqrt(counts @ (values - mean[c]) ** 2 / counts.sum())

    def to_images(data: np.ndarray) -> Tensor:
        x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
        if standardize:
            m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
            x = (x - m) / torch.clamp(s, min=1e-12)  # a constant channel stays finite
        return x

    info = {
        "folder": str(root),
        "classes": list(CIFAR10_CLASSES),
        "standardize": standardize,
        "mean": mean.tolist(),
        "std": std.tolist(),
    }
    return assemble_task(
        f"cifar10:{folder}", x_train, y_train, 10, info, rng=np.random.default_rng(seed),
        test_fraction=None, n_train=n_train, n_test=n_test, x_test=x_test, y_test=y_test,
        to_inputs=to_images,
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file; anything unreadable becomes a ValueError naming the file."""
    # Garbage bytes, a truncated archive or an object (pickled) array raise zipfile, pickle or
    # OS errors whose tracebacks do not say which file is bad: report the file instead.
    unreadable = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile)
    if not zipfile.is_zipfile(path):  # np.load would blame "pickled data" on any other file
        with open(path, "rb") as f:
            single = f.read(6) == b"\x93NUMPY"
        raise ValueError(f"cannot read {str(path)!r} as an .npz archive: " + (
            "it holds a single .npy array" if single else
            "it is not one (an .npz file is a zip of .npy arrays, as numpy.savez writes)"))
    try:
        archive = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise ValueError(f"cannot read {str(path)!r} as an .npz archive: {exc}") from None
    if isinstance(archive, np.ndarray):
        raise ValueError(
            f"cannot read {str(path)!r} as an .npz archive: it holds a single .npy array"
        )
    try:
        with archive:
            return {key: archive[key] for key in archive.files}
    except unreadable as exc:
        raise ValueError(f"cannot read {str(path)!r} as an .npz archive: {exc}") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # any unpickling failure means: not a CIFAR-10 batch
        raise ValueError(f"cannot read {str(path)!r} as a CIFAR-10 python batch: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"{str(path)!r} is not a CIFAR-10 python batch: expected a dict with b'data' and "
            f"b'labels', got {keys}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"{str(path)!r}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} "
            f"{data.shape}"
        )
    if labels.shape != (len(data),) or not _is_integer(labels):
        raise ValueError(
            f"{str(path)!r}: b'labels' must be {len(data)} integers, got {labels.dtype} "
            f"{labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(
            f"{str(path)!r}: labels outside 0..9 (min {labels.min()}, max {labels.max()})"
        )
    return data, labels.astype(np.int64)


def _is_integer(a: np.ndarray) -> bool:
    return bool(np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_)


def _check_inputs(key: str, x: np.ndarray, where: str) -> None:
    if x.ndim < 2:
        raise ValueError(
            f"{where}: {key!r} must have shape (n, features...), got {x.shape}; "
            "for one feature per sample write x[:, None]"
        )
    if len(x) == 0:
        raise ValueError(f"{where}: {key!r} has no samples")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise ValueError(f"{where}: {key!r} must be real numbers, got dtype {x.dtype}")
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{where}: {key!r} has non-finite values (NaN or inf), first in sample "
            f"{int(np.argmax(bad))}"
        )


def _check_targets(
    key: str, y: np.ndarray, n: int, classification: bool, where: str
) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{where}: {key!r} must have shape (n,), got {y.shape}")
    if len(y) != n:
        x_key = "x" if key == "y" else "x_test"
        raise ValueError(f"{where}: {x_key!r} has {n} samples but {key!r} has {len(y)}")
    if classification:
        if len(y) and y.min() < 0:
            raise ValueError(f"{where}: {key!r} has a negative class label {int(y.min())}")
        return y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.floating):
        raise ValueError(
            f"{where}: {key!r} must be integer (classification) or floating (regression), "
            f"got dtype {y.dtype}"
        )
    bad = ~np.isfinite(y)
    if bad.any():
        raise ValueError(
            f"{where}: {key!r} has non-finite values (NaN or inf), first in sample "
            f"{int(np.argmax(bad))}"
        )
    return y
