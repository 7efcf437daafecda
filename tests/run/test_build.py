"""A run's task and model from its config: built-in, Hugging Face, or the user's own code."""

import sys
import textwrap

import pandas as pd
import pytest
import torch
from helpers import run_main
from torch import nn

from sgn_lab.data import Task
from sgn_lab.run.build import build_run_model, build_task, check_fits, model_kind
from sgn_lab.run.config import parse, read_file
from sgn_lab.run.loop import run_measurement
from sgn_lab.run.rundir import TIMING_COLUMNS, load_run

USER_CODE = '''
from torch import nn

from sgn_lab.data import load_task


def mixture(seed, n=300):
    return load_task("gaussian-mixture", seed=seed, n=n)


def mlp(input_shape, num_outputs, hidden=16):
    # the layers of the built-in mlp with depth 1, in the same order: the same initial weights
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(),
                         nn.Linear(hidden, num_outputs))


def wrong_outputs(input_shape, num_outputs):
    return nn.Linear(input_shape[0], num_outputs + 3)
'''

SMALL = dict(width=16, depth=1, steps=20, measure_every=10, probe_samples=24, batch_size=16,
             device="cpu", method="sgd", update_repeats=3)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A researcher's working directory with `mymodels.py`."""
    (tmp_path / "mymodels.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("mymodels", None)
    yield tmp_path
    sys.modules.pop("mymodels", None)


def _metrics(out):
    return load_run(out).metrics.drop(columns=[*TIMING_COLUMNS, "run", "label", "task",
                                               "model"])


def test_user_model_and_task_measure_what_the_built_ins_measure(project):
    builtin = run_measurement(parse({**SMALL, "task": "gaussian-mixture:n=300",
                                     "model": "mlp"}), project / "builtin")
    user = run_measurement(parse({**SMALL, "task": "mymodels:mixture",
                                  "task_options": {"n": 300}, "model": "mymodels:mlp",
                                  "model_options": {"hidden": 16}}), project / "user")
    pd.testing.assert_frame_equal(_metrics(builtin), _metrics(user), check_exact=True)
    saved = load_run(user).config
    assert saved["model"]["name"] == "mymodels:mlp"
    assert saved["model"]["options"] == {"hidden": 16}
    assert saved["task"]["options"] == {"n": 300}


def test_toml_tables_and_cli_flags_for_user_code(project, monkeypatch, capsys):
    (project / "run.toml").write_text(textwrap.dedent('''
        [task]
        name = "mymodels:mixture"
        options = { n = 200 }
        [model]
        name = "mymodels:mlp"
        options = { hidden = 8 }
    '''))
    config = parse(read_file(project / "run.toml"))
    assert config.task.options == {"n": 200} and config.model.options == {"hidden": 8}
    code, out, err = run_main(monkeypatch, capsys, "measure", "--config", "run.toml",
                              "--model-options", "hidden=4", "--steps", "2",
                              "--measure-every", "2", "--probe-samples", "8",
                              "--batch-size", "8", "--device", "cpu", "--out", "r")
    assert code == 0, err
    assert load_run(project / "r").config["model"]["options"] == {"hidden": 4}


@pytest.mark.parametrize(("flags", "shown"), [
    (["--model", "mymodels:nothing"], "model 'mymodels:nothing': mymodels has no attribute"),
    (["--model", "missing_pkg.models:make"], "no module named 'missing_pkg'"),
    (["--task", "mymodels:mixture", "--task-options", "colour=red"], "takes no option(s) colour"),
    (["--model", "mymodels:wrong_outputs", "--task", "linreg"], "does not fit task 'linreg'"),
    (["--model", "mlp", "--model-options", "colour=red"], "model 'mlp' takes no option(s) colour"),
    (["--model", "mlp", "--task", "markov"], "task 'markov' has token sequences"),
    (["--model", "gpt2", "--task", "digits"], "needs a language task"),
    (["--model", "hf:no-such-folder"], "no-such-folder"),
    (["--model", "notamodel"], "unknown model 'notamodel'"),
])
def test_bad_user_code_is_one_line_and_exit_2(project, monkeypatch, capsys, flags, shown):
    code, _, err = run_main(monkeypatch, capsys, "measure", "--out", "bad", "--steps", "1",
                            "--device", "cpu", *flags)
    assert code == 2
    assert shown in err and len(err.strip().splitlines()) == 1, err


def test_check_fits_changes_nothing_and_names_the_pair():
    x = torch.randn(6, 3)
    task = Task("t", x, torch.zeros(6, dtype=torch.long), x, torch.zeros(6, dtype=torch.long),
                2)
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    check_fits(model, task, name="m")
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="model 'm' does not fit task 't': RuntimeError"):
        check_fits(nn.Linear(4, 2), task, name="m")
    summed = Task("t", x, x[:, 0], x, x[:, 0], 0,
                  loss=lambda out, y: (out[:, 0] - y) ** 2)  # not mean-reduced
    with pytest.raises(ValueError, match=r"gives \(2,\), not one number"):
        check_fits(nn.Linear(3, 1), summed, name="m")


def test_model_kinds():
    assert model_kind("mlp") == "builtin" and model_kind("gpt2") == "transformer"
    assert model_kind("hf:/models/tiny") == "pretrained"
    assert model_kind("lab.models:make") == "user"
    with pytest.raises(ValueError, match="hf:PATH"):
        model_kind("hf:")


def test_language_run_with_gpt2_on_a_text_file(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "corpus.txt").write_text(text)
    config = parse({**SMALL, "task": f"text:{tmp_path / 'corpus.txt'}",
                    "task_options": {"context": 8, "tokens": "char"}, "model": "gpt2",
                    "heads": 2, "instruments": ["eval", "sgn"]})
    task = build_task(config)
    torch.manual_seed(0)
    model = build_run_model(config, task)
    assert model(task.x_train[:3]).shape == (3, 8, task.num_classes)
    run = load_run(run_measurement(config, tmp_path / "lm"))
    assert run.complete and run.metrics["trace"].gt(0).all()
    # token accuracy lies in [0, 1] (it counts every predicted token, not every window)
    assert run.metrics["train_accuracy"].between(0, 1).all()


def test_a_saved_hugging_face_model_from_its_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = parse({**SMALL, "task": "markov:n=200,context=8,vocab=12", "steps": 10,
                    "measure_every": 10, "instruments": ["sgn"]})
    task = build_task(config)
    torch.manual_seed(0)
    saved = GPT2LMHeadModel(GPT2Config(vocab_size=12, n_positions=8, n_embd=16, n_layer=1,
                                       n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    saved.save_pretrained(tmp_path / "tiny")
    loaded = parse({**config.flat(), "model": f"hf:{tmp_path / 'tiny'}"})
    model = build_run_model(loaded, task)
    saved.eval()
    torch.testing.assert_close(model(task.x_train[:4]), saved(input_ids=task.x_train[:4]).logits)
    run = load_run(run_measurement(loaded, tmp_path / "run"))
    assert run.complete and run.metrics["trace"].gt(0).all()
    with pytest.raises(ValueError, match="is loaded as saved; it takes no options"):
        build_run_model(parse({**loaded.flat(), "model_options": {"dropout": 0.1}}), task)


def test_eval_and_the_fit_check_keep_each_modules_own_mode():
    from sgn_lab.run import NoiseProbe

    x = torch.randn(16, 3)
    y = torch.randint(0, 2, (16,))
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[1].eval()  # a frozen normalisation, kept in eval mode on purpose
    task = Task("t", x, y, x, y, 2)
    check_fits(model, task, name="m")
    NoiseProbe(model, torch.nn.functional.cross_entropy, x, y, samples=8,
               instruments=["eval"]).measure(0)
    assert [m.training for m in model] == [True, False, True] and model.training
