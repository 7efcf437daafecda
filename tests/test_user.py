"""User code by reference (`pkg.module:callable`): import, the task and model protocols, errors."""

import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from sgn_lab.data import Task
from sgn_lab.data.user_tasks import user_task
from sgn_lab.models.losses import half_mse, token_cross_entropy
from sgn_lab.user import import_callable, is_reference, user_model

MODULE = '''
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sgn_lab.data import Task

CALLS = []


def pairs(n=40, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return {"train": (x, (x[:, 0] > 0).long())}


def regression(n=30, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2)).astype(np.float32)
    return {"train": (x, x.sum(axis=1)), "test": (x[:5], x[:5].sum(axis=1))}


class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.tensor([float(i), 1.0]), i % 3


def dataset():
    return {"train": Squares(), "test": Squares(), "num_classes": 3}


def full(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 2, generator=g)
    return Task("mine", x, torch.zeros(20, dtype=torch.long), x[:4],
                torch.zeros(4, dtype=torch.long), 2)


def with_loss():
    x = torch.randn(10, 2)
    return {"train": (x, x[:, 0]), "loss": lambda out, y: (out[:, 0] - y).abs().mean()}


def mlp(input_shape, num_outputs, hidden=4):
    CALLS.append((input_shape, num_outputs, hidden))
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(),
                         nn.Linear(hidden, num_outputs))


def not_a_model():
    return "a string"


def broken():
    raise RuntimeError("out of coffee")


def bad_labels():
    return {"train": (torch.randn(4, 2), torch.tensor([0, 1, 5, 1])), "num_classes": 2}


def bad_key():
    return {"train": (torch.randn(4, 2), torch.zeros(4)), "valid": None}


def mismatched():
    return {"train": (torch.randn(4, 2), torch.zeros(3))}


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory holding `mytasks.py`, as a researcher's project would."""
    (tmp_path / "mytasks.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, "mytasks", raising=False)
    yield tmp_path
    __import__("sys").modules.pop("mytasks", None)


def test_reference_form():
    assert is_reference("pkg.module:make")
    assert is_reference("m:Class.build")
    for text in ("mlp", "linreg:dim=50", "hf:./model", "npz:/data/x.npz", "a:b:c", ":f", "m:"):
        assert not is_reference(text), text


def test_imports_from_the_working_directory(user_dir):
    function = import_callable("mytasks:pairs", what="task")
    assert function.__module__ == "mytasks"
    assert str(user_dir) not in __import__("sys").path  # the path is put back


def test_pairs_are_split_with_the_seed_like_a_builtin_task(user_dir):
    task = user_task("mytasks:pairs", seed=3, options={"n": 40})
    assert isinstance(task, Task)
    assert len(task.x_train) == 30 and len(task.x_test) == 10  # the default 0.25 held out
    assert task.num_classes == 2 and task.y_train.dtype == torch.long
    # the seed reached the callable, and the split is a permutation of its data
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g)
    joined = torch.cat([task.x_train, task.x_test])
    assert sorted(map(tuple, joined.tolist())) == sorted(map(tuple, x.tolist()))
    again = user_task("mytasks:pairs", seed=3, options={"n": 40})
    assert torch.equal(again.x_train, task.x_train)
    other = user_task("mytasks:pairs", seed=4, options={"n": 40})
    assert not torch.equal(other.x_train, task.x_train)
    assert len(user_task("mytasks:pairs", seed=3, options={}, n_train=7).x_train) == 7


def test_regression_arrays_with_a_test_set(user_dir):
    task = user_task("mytasks:regression", seed=0, options={})
    assert task.num_classes == 0 and task.y_train.is_floating_point()
    assert len(task.x_train) == 30 and len(task.x_test) == 5  # its own test set, unsplit
    np.testing.assert_allclose(task.y_train.numpy(), task.x_train.sum(dim=1).numpy(),
                               rtol=1e-6)
    assert task.loss_fn is half_mse


def test_dataset_items_are_read_into_tensors(user_dir):
    task = user_task("mytasks:dataset", seed=0, options={})
    assert task.num_classes == 3 and task.x_train.shape == (12, 2)
    expected = {(float(i), i % 3) for i in range(12)}
    got = {(float(x[0]), int(y)) for x, y in zip(task.x_train, task.y_train, strict=True)}
    assert got == expected


def test_a_task_object_and_a_loss_of_ones_own(user_dir):
    task = user_task("mytasks:full", seed=5, options={}, n_train=8)
    assert task.name == "mine" and len(task.x_train) == 8
    custom = user_task("mytasks:with_loss", seed=0, options={})
    out = torch.zeros(len(custom.x_train), 1)
    assert float(custom.loss_fn(out, custom.y_train)) == pytest.approx(
        float(custom.y_train.abs().mean()))


def test_model_gets_shape_and_outputs(user_dir):
    task = user_task("mytasks:pairs", seed=0, options={})
    model = user_model("mytasks:mlp", task, options={"hidden": 6})
    assert isinstance(model, nn.Module)
    import mytasks

    assert mytasks.CALLS[-1] == ((3,), 2, 6)
    assert model(task.x_train).shape == (len(task.x_train), 2)


@pytest.mark.parametrize(("reference", "options", "shown"), [
    ("nosuchmodule:make", {}, "no module named 'nosuchmodule'"),
    ("mytasks:missing", {}, "has no attribute 'missing'"),
    ("mytasks:NOT_CALLABLE", {}, "is a int, not a callable"),
    ("mytasks:pairs", {"colour": 1}, "takes no option(s) colour"),
    ("mytasks:broken", {}, "raised RuntimeError: out of coffee"),
    ("mytasks:not_a_model", {}, "returned a str"),
    ("mytasks:bad_labels", {}, "labels must lie in [0, 2), got 0..5"),
    ("mytasks:bad_key", {}, "returned keys ['train', 'valid']"),
    ("mytasks:mismatched", {}, "train has 4 inputs but 3 targets"),
])
def test_errors_are_one_line_naming_the_reference(user_dir, reference, options, shown):
    with pytest.raises(ValueError) as info:
        if reference.endswith("not_a_model"):
            task = user_task("mytasks:pairs", seed=0, options={})
            user_model(reference, task, options=options)
        else:
            user_task(reference, seed=0, options=options)
    message = str(info.value)
    assert shown in message and reference in message and "\n" not in message


def test_an_import_error_inside_the_module_is_named(user_dir):
    (user_dir / "brokenmod.py").write_text("import no_such_dependency_xyz\n")
    with pytest.raises(ValueError, match="importing brokenmod failed: ModuleNotFoundError"):
        import_callable("brokenmod:f", what="model")


def test_token_sequences_get_the_next_token_loss(user_dir):
    (user_dir / "lm.py").write_text(textwrap.dedent('''
        import torch
        def make(seed):
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, 7, (10, 5), generator=g)
            return {"train": (ids[:, :-1], ids[:, 1:]), "num_classes": 7}
    '''))
    task = user_task("lm:make", seed=0, options={})
    assert task.is_sequence and task.loss_fn is token_cross_entropy


def test_load_task_takes_a_reference_like_a_task_string(user_dir):
    from sgn_lab.data import load_task

    direct = user_task("mytasks:pairs", seed=3, options={"n": 40}, n_train=9)
    loaded = load_task("mytasks:pairs", seed=3, n=40, n_train=9)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(direct, field), getattr(loaded, field))
    with pytest.raises(ValueError, match="returns its own test set"):
        load_task("mytasks:regression", seed=0, test_fraction=0.5)
