"""The typed run config: one schema, validated once, every hyperparameter resolved."""

import math
import re

import pytest

from sgn_lab.optim import METHODS, SETTINGS
from sgn_lab.run.config import (
    FIELDS,
    SECTIONS,
    RunConfig,
    differences,
    help_text,
    parse,
    read_file,
)


def test_flat_and_nested_keys_are_one_schema(tmp_path):
    flat = parse({"method": "pnm", "beta0": 2.0, "lr": 0.05, "batch_size": 32, "task": "digits"})
    nested = parse({"optimizer": {"method": "pnm", "beta0": 2.0, "lr": 0.05},
                    "training": {"batch_size": 32}, "task": {"name": "digits"}})
    assert flat == nested
    file = tmp_path / "run.toml"
    file.write_text('[optimizer]\nmethod = "pnm"\nbeta0 = 2.0\nlr = 0.05\n'
                    '[training]\nbatch_size = 32\n[task]\nname = "digits"\n')
    assert parse(read_file(file)) == flat
    # Every flat name is one key of one section, and every key has a help text.
    assert len(FIELDS) == sum(len(model.model_fields) for model in SECTIONS.values())
    assert all(help_text(name) for name in FIELDS)


@pytest.mark.parametrize(("data", "message"), [
    ({"batch_size": True}, "config key 'batch_size': input should be a valid integer, got True"),
    ({"steps": "20"}, "config key 'steps': input should be a valid integer, got '20'"),
    ({"fresh_probe": "yes"}, "config key 'fresh_probe': input should be a valid boolean, "
                             "got 'yes'"),
    ({"lr": math.nan}, "config key 'lr': input should be a finite number, got nan"),
    ({"lr": 0.0}, "config key 'lr': input should be greater than 0, got 0.0"),
    ({"instruments": ["sgn", "hessian"]}, "unknown instrument 'hessian'"),
    ({"method": "sgd", "beta0": 0.5}, "beta0 does not apply to method 'sgd' (only to pnm, "
                                      "adapnm)"),
    ({"method": "adamw"}, "unknown method 'adamw'"),
    ({"model": "transformer9"}, "unknown model 'transformer9'"),
    ({"methd": "pnm"}, "unknown config key(s): methd"),
    ({"optimizer": {"lr": "fast"}}, "config key 'lr': input should be a valid number, got 'fast'"),
    ({"grads": "gram", "instruments": ["curvature"]}, "the curvature instrument needs per-sample "
                                                      "gradients"),
])
def test_bad_values_name_the_key_the_value_and_the_type(data, message):
    with pytest.raises(ValueError) as error:
        parse(data)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_hyperparameter_of_the_method_is_resolved(method):
    config = parse({"method": method, "batch_size": 64}).resolved()
    settings = config.optimizer.settings()
    assert set(settings) == set(SETTINGS[method])
    for name, value in settings.items():
        if SETTINGS[method][name] is None and name == "small_batch":
            assert value == 8  # covariance noise: B/8
        elif SETTINGS[method][name] is not None:
            assert value == SETTINGS[method][name], name
    stored = config.to_dict()["optimizer"]
    assert set(stored) == {"method", "lr", *SETTINGS[method]}  # nothing that does not apply
    assert parse(config.to_dict()) == config


def test_the_run_name_tells_runs_apart():
    assert parse({}).run_name == "pnm-s0"
    assert parse({"method": "pnm", "beta0": 1.0}).run_name == "pnm-s0"  # the default
    assert parse({"method": "pnm", "beta0": 2.0, "seed": 3}).run_name == "pnm-beta0=2-s3"
    assert parse({"method": "pnm", "lr": 0.05}).label == "pnm-lr=0.05"
    assert parse({"method": "covariance", "variant": "diagonal", "small_batch": 4}).label == (
        "covariance-small_batch=4-variant=diagonal")
    assert parse({"name": "mine"}).run_name == "mine"


def test_differences_list_the_keys_that_changed():
    saved = parse({"method": "pnm", "lr": 0.1, "steps": 100})
    asked = parse({"method": "pnm", "lr": 0.05, "steps": 100, "beta0": 1.0})
    assert differences(saved, asked) == ["lr: 0.1 -> 0.05"]
    assert differences(saved, saved) == []
    assert RunConfig().resolved() == parse({}).resolved()


def test_parse_method_spec_reads_hyperparameters_and_writes_them_back():
    from sgn_lab.run.config import method_spec_text, parse_method_spec

    spec = parse_method_spec(" pnm:beta0=2:lr=0.05 ")
    assert spec == {"method": "pnm", "beta0": 2, "lr": 0.05}
    assert method_spec_text(spec) == "pnm:beta0=2:lr=0.05"
    assert parse_method_spec("sgd") == {"method": "sgd"}


@pytest.mark.parametrize(("item", "message"), [
    ("pnm:beta0", "--methods: 'beta0' in 'pnm:beta0' is not key=value"),
    ("pnm:=2", "--methods: '=2' in 'pnm:=2' is not key=value"),
    ("pnm:gamma=2", "--methods: 'gamma' in 'pnm:gamma=2' is no hyperparameter of a method"),
    ("pnm:method=sgd", "'method' in 'pnm:method=sgd' is no hyperparameter of a method"),
    ("sgd:batch_size=8", "'batch_size' in 'sgd:batch_size=8' is no hyperparameter"),
])
def test_parse_method_spec_refuses_in_one_line(item, message):
    from sgn_lab.run.config import parse_method_spec

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_method_spec(item)
