"""Measurement runs: the CLI end to end, run directories, resume, NoiseProbe, update noise."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import interrupt_at, run_main
from torch import nn
from typer.testing import CliRunner

import sgn_lab
from sgn_lab.cli.app import app
from sgn_lab.grads import flatten_grads, per_sample_grads
from sgn_lab.optim import PNM, pnm_noise_factor
from sgn_lab.run import NoiseProbe, update_noise
from sgn_lab.run.config import RunConfig, parse
from sgn_lab.run.loop import run_measurement
from sgn_lab.run.rundir import TIMING_COLUMNS, load_checkpoint, load_run
from sgn_lab.stats.noise import minibatch_factor, noise_stats

runner = CliRunner()

SMALL = ["--task", "gaussian-mixture", "--model", "mlp", "--width", "16", "--depth", "1",
         "--steps", "20", "--measure-every", "10", "--probe-samples", "24", "--batch-size", "16",
         "--device", "cpu"]


def small_config(**overrides) -> RunConfig:
    base = dict(task="gaussian-mixture", model="mlp", width=16, depth=1, steps=30,
                measure_every=10, probe_samples=24, batch_size=16, device="cpu", method="pnm")
    return parse({**base, **overrides})


def test_measure_end_to_end_writes_documented_files_and_columns(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["measure", "--out", str(out), "--method", "pnm", "--beta0",
                                 "0.5", "--update-repeats", "4", *SMALL])
    assert result.exit_code == 0, result.output
    for name in ("config.json", "metrics.csv", "spectra.csv", "checkpoint.pt"):
        assert (out / name).is_file()
    assert not list(out.glob(".*tmp"))  # no temporary file left behind

    run = load_run(out)
    assert run.complete
    assert run.config["optimizer"] == {"method": "pnm", "lr": 0.1, "beta0": 0.5, "beta1": 0.9,
                                       "weight_decay": 0.0}  # every hyperparameter, resolved
    assert run.config["training"]["steps"] == 20 and run.config["training"]["seed"] == 0
    assert run.config["run"] == "pnm-beta0=0.5-s0"
    metrics = run.metrics
    assert list(metrics["step"]) == [0, 10, 20]
    stats_columns = noise_stats(torch.randn(10, 3, dtype=torch.float64)).to_dict().keys()
    expected = {"run", "label", "task", "model", "method", "seed", "lr", "batch_size", "beta0",
                "beta1", "weight_decay", "step", "epoch", "train_loss",
                "train_accuracy", "test_loss", "test_accuracy", "update_trace",
                "update_effective_rank", *stats_columns}
    assert expected <= set(metrics.columns), expected - set(metrics.columns)
    assert (metrics["method"] == "pnm").all() and (metrics["n"] == 24).all()
    assert (metrics["trace"] > 0).all() and (metrics["update_trace"] > 0).all()
    spectra = run.spectra
    assert list(spectra.columns) == ["run", "label", "method", "seed", "step", "kind", "k",
                                     "eigenvalue"]
    assert set(spectra["kind"]) == {"sgn", "isotropic", "update"}
    update = spectra[(spectra["step"] == 10) & (spectra["kind"] == "update")]
    update10 = metrics.loc[metrics["step"] == 10, "update_trace"].item()
    assert len(update) <= 3 and update["eigenvalue"].sum() == pytest.approx(update10, rel=1e-9)
    sgn = spectra[(spectra["step"] == 10) & (spectra["kind"] == "sgn")]
    assert list(sgn["k"]) == list(range(1, len(sgn) + 1)) and len(sgn) <= 23
    assert np.all(np.diff(sgn["eigenvalue"].to_numpy()) <= 0)
    # The spectrum sums to the measured trace.
    trace10 = metrics.loc[metrics["step"] == 10, "trace"].item()
    assert sgn["eigenvalue"].sum() == pytest.approx(trace10, rel=1e-9)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 20


@pytest.mark.parametrize("stop_step", [11, 25], ids=["at-measurement", "mid-interval"])
@pytest.mark.parametrize("method", ["pnm", "gaussian"])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, stop_step, method):
    extra = {"sigma": 0.01} if method == "gaussian" else {}
    config = small_config(method=method, update_repeats=3, **extra)
    full = load_run(run_measurement(config, tmp_path / "full"))

    with pytest.raises(KeyboardInterrupt):
        run_measurement(small_config(method=method, update_repeats=3, **extra),
                        tmp_path / "cut", progress=interrupt_at(stop_step))
    partial = load_run(tmp_path / "cut")
    assert not partial.complete and partial.metrics["step"].max() == (stop_step - 1) // 10 * 10
    resumed = load_run(run_measurement(None, tmp_path / "cut", resume=True))

    assert resumed.complete
    drop = list(TIMING_COLUMNS)
    pd.testing.assert_frame_equal(full.metrics.drop(columns=drop),
                                  resumed.metrics.drop(columns=drop), check_exact=True)
    pd.testing.assert_frame_equal(full.spectra, resumed.spectra, check_exact=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_complete_run_changes_nothing(tmp_path):
    out = run_measurement(small_config(steps=10), tmp_path / "r")
    before = (out / "metrics.csv").read_bytes()
    run_measurement(None, out, resume=True)
    assert (out / "metrics.csv").read_bytes() == before


def test_toml_config_with_flags_overriding_it(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('method = "momentum"\nlr = 0.05\nmomentum = 0.8\nsteps = 10\n'
                      'measure_every = 5\n')
    out = tmp_path / "r"
    result = runner.invoke(app, ["measure", "--config", str(config), "--lr", "0.02",
                                 "--out", str(out), *SMALL[:8], "--device", "cpu",
                                 "--probe-samples", "16"])
    assert result.exit_code == 0, result.output
    saved = load_run(out).config["optimizer"]
    assert (saved["method"], saved["lr"], saved["momentum"]) == ("momentum", 0.02, 0.8)
    assert list(load_run(out).metrics["step"]) == [0, 5, 10]
    # The saved config re-runs the same thing.
    rerun = runner.invoke(app, ["measure", "--config", str(out / "config.json"),
                                "--out", str(tmp_path / "again")])
    assert rerun.exit_code == 0, rerun.output
    pd.testing.assert_frame_equal(
        load_run(out).metrics.drop(columns=list(TIMING_COLUMNS)),
        load_run(tmp_path / "again").metrics.drop(columns=list(TIMING_COLUMNS)),
    )


def test_compare_writes_one_run_per_method_and_seed(tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "--methods", "sgd,pnm", "--seeds", "0,1",
                                 "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["pnm-s0", "pnm-s1", "sgd-s0", "sgd-s1"]
    assert "final measurement" in result.output and "pnm" in result.output
    assert load_run(out / "pnm-s1").config["training"]["seed"] == 1


def test_plot_writes_png_and_pdf(tmp_path):
    out = run_measurement(small_config(steps=10), tmp_path / "r")
    result = runner.invoke(app, ["plot", str(out), "--out", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    for name in ("metrics.png", "metrics.pdf", "spectra.png", "spectra.pdf"):
        assert (tmp_path / "fig" / name).stat().st_size > 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "lbfgs"], "unknown method 'lbfgs'"),
        (["--batch-size", "-3"], "config key 'batch_size': input should be greater than or "
                                 "equal to 1, got -3"),
        (["--task", "npz:/nonexistent/data.npz"], "/nonexistent/data.npz"),
        (["--method", "sgd", "--beta0", "0.5"], "beta0 does not apply to method 'sgd'"),
        (["--device", "tpu"], "config key 'device': input should be 'auto', 'cpu' or 'cuda', "
                              "got 'tpu'"),
        (["--steps", "-1"], "config key 'steps': input should be greater than or equal to 0, "
                            "got -1"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    code, out, err = run_main(monkeypatch, capsys, "measure", "--out", str(tmp_path / "r"),
                              "--steps", "2", "--probe-samples", "8", *args)
    assert code == 2, (out, err)
    assert message in err
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1


def test_corrupt_npz_and_existing_run_and_unknown_config_key(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    code, _, err = run_main(monkeypatch, capsys, "measure", "--task", f"npz:{bad}",
                            "--out", str(tmp_path / "a"))
    assert code == 2 and "bad.npz" in err

    out = run_measurement(small_config(steps=0), tmp_path / "done")
    code, _, err = run_main(monkeypatch, capsys, "measure", "--out", str(out))
    assert code == 2 and "--resume" in err

    config = tmp_path / "c.toml"
    config.write_text("methd = 'pnm'\n")
    code, _, err = run_main(monkeypatch, capsys, "measure", "--config", str(config))
    assert code == 2 and "unknown config key(s): methd" in err


def test_noise_probe_in_a_users_own_loop_leaves_its_randomness_alone():
    torch.manual_seed(0)
    x, y = torch.randn(200, 5), torch.randint(0, 3, (200,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.functional.cross_entropy
    probe = NoiseProbe(model, loss_fn, x, y, every=5, samples=32, batch_size=20,
                       update_repeats=3, optimizer=opt, method="sgd", seed=1)
    results = []
    for step in range(11):
        state = torch.get_rng_state()
        result = probe(step)
        assert torch.equal(state, torch.get_rng_state())  # measuring draws nothing from it
        if result is not None:
            results.append(result)
        idx = torch.randint(0, 200, (20,))
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    assert [r.step for r in results] == [0, 5, 10]
    row = results[-1].row
    assert row["n"] == 32 and row["batch_size"] == 20 and row["dataset_size"] == 200
    assert math.isnan(row.get("test_loss", math.nan))
    assert 0.0 <= row["train_accuracy"] <= 1.0 and row["update_trace"] > 0


def _regression_model(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(120, 4, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) + 0.3 * torch.randn(
        120, dtype=torch.float64)
    model = nn.Linear(4, 1).double()
    return model, x, y


def _half_mse(out, t):
    return 0.5 * (out.squeeze(-1) - t).pow(2).mean()


@pytest.mark.parametrize("method", ["sgd", "pnm"])
def test_update_noise_has_the_covariance_of_the_minibatch_gradient(method):
    """One step from a fixed state: SGD's Δθ = −η·g_B, PNM's first step Δθ = −c·η·g_B with
    c = (1+β0)(1−β1²)/sqrt((1+β0)²+β0²). So Cov[Δθ] = (c·η)²·(1/B − 1/N)·S exactly, with S
    from all N per-sample gradients and mean −c·η·G known; checked by Monte Carlo over R."""
    model, x, y = _regression_model()
    lr, B, R, N = 0.1, 10, 600, len(x)
    if method == "sgd":
        opt, c = torch.optim.SGD(model.parameters(), lr=lr), 1.0
    else:
        beta1, beta0 = 0.9, 0.5
        opt = PNM(model.parameters(), lr=lr, betas=(beta1, beta0))
        c = (1 + beta0) * (1 - beta1**2) / math.sqrt(pnm_noise_factor(beta0))
    G = flatten_grads(per_sample_grads(model, _half_mse, x, y))
    full = noise_stats(G, shape=False)
    expected_trace = (c * lr) ** 2 * full.trace * minibatch_factor(B, dataset_size=N)
    updates = update_noise(model, opt, method, _half_mse, x, y, batch_size=B, repeats=R, seed=3)
    z = ((updates + c * lr * full.mean) ** 2).sum(dim=1).numpy()  # exact mean is known
    assert abs(z.mean() - expected_trace) < 5 * z.std(ddof=1) / math.sqrt(R)
    measured = noise_stats(updates, shape=False).trace
    assert measured == pytest.approx(expected_trace, rel=10 * math.sqrt(2 / R))
    # The model and optimizer passed in are untouched.
    assert not opt.state or all(
        torch.equal(v, torch.zeros_like(v)) for s in opt.state.values() for v in s.values()
        if isinstance(v, torch.Tensor)
    )


def test_probe_gram_path_measures_what_the_vmap_path_measures():
    torch.manual_seed(0)
    x, y = torch.randn(300, 6, dtype=torch.float64), torch.randint(0, 3, (300,))
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    common = dict(every=1, samples=64, batch_size=16, seed=2)
    fast = NoiseProbe(model, nn.functional.cross_entropy, x, y, grads="auto", **common)
    slow = NoiseProbe(model, nn.functional.cross_entropy, x, y, grads="vmap", **common)
    assert fast.grads == "gram" and slow.grads == "vmap"
    a, b = fast.measure(3), slow.measure(3)
    assert a.row["grads"] == "gram" and b.row["grads"] == "vmap"
    for key in ("trace", "mean_sq_norm", "noise_scale", "effective_rank", "powerlaw_exponent",
                "minibatch_trace", "isotropic_effective_rank"):
        assert a.row[key] == pytest.approx(b.row[key], rel=1e-9), key
    assert torch.allclose(a.noise.eigenvalues, b.noise.eigenvalues, rtol=1e-8)
    assert torch.allclose(a.noise.mean, b.noise.mean, rtol=1e-10, atol=1e-14)
    assert math.isfinite(a.row["tail_index"])  # from the shape subset
    # Curvature needs per-sample gradients: auto falls back to vmap, gram refuses.
    curv = NoiseProbe(model, nn.functional.cross_entropy, x, y, curvature=True, **common)
    assert curv.grads == "vmap"
    with pytest.raises(ValueError, match="curvature needs per-sample gradients"):
        NoiseProbe(model, nn.functional.cross_entropy, x, y, curvature=True, grads="gram",
                   **common)
    with pytest.raises(ValueError, match="grads must be one of auto, vmap, gram, got 'fast'"):
        NoiseProbe(model, nn.functional.cross_entropy, x, y, grads="fast", **common)


def test_probe_auto_checks_the_gram_at_its_first_measurement(monkeypatch):
    import sgn_lab.grads.rules as rules

    torch.manual_seed(0)
    x, y = torch.randn(100, 6, dtype=torch.float64), torch.randint(0, 3, (100,))
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    probe = NoiseProbe(model, nn.functional.cross_entropy, x, y, every=1, samples=32, seed=1)
    probe.measure(0)
    assert probe.coverage is not None and probe.coverage.routes["0.weight"] == "ghost"

    real = rules.RULES[nn.functional.linear]

    def wrong(op):  # a rule whose bias terms are twice what they should be
        plan = real.plan(op)

        def terms(saved, signal):
            out = plan.terms(saved, signal)
            if "bias" in out:
                out["bias"] = rules.Dense(out["bias"].grads * 2, "linear")
            return out

        return rules.Plan(plan.takes, plan.declined, plan.keep, plan.sample, terms)

    monkeypatch.setitem(rules.RULES, nn.functional.linear,
                        rules.Rule("linear", real.slots, real.defaults, wrong))
    fresh = NoiseProbe(model, nn.functional.cross_entropy, x, y, every=1, samples=32, seed=1)
    with pytest.raises(sgn_lab.GramMismatchError, match=r"0\.bias .*2\.bias"):
        fresh.measure(0)
    unchecked = NoiseProbe(model, nn.functional.cross_entropy, x, y, every=1, samples=32,
                           seed=1, grads="gram")
    unchecked.measure(0)  # asked for gram explicitly: no spot check, and nobody would know


def test_measure_grads_flag_and_resume_in_gram_mode(tmp_path):
    config = small_config(grads="gram", steps=20)
    full = load_run(run_measurement(config, tmp_path / "full"))
    assert set(full.metrics["grads"]) == {"gram"}
    with pytest.raises(KeyboardInterrupt):
        run_measurement(small_config(grads="gram", steps=20), tmp_path / "cut",
                        progress=interrupt_at(15))
    resumed = load_run(run_measurement(None, tmp_path / "cut", resume=True))
    drop = list(TIMING_COLUMNS)
    pd.testing.assert_frame_equal(full.metrics.drop(columns=drop),
                                  resumed.metrics.drop(columns=drop), check_exact=True)
