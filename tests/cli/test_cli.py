"""The `sgn-lab` command: a short real run, and bad input ending in one line and exit 2."""


import pytest
from helpers import run_main
from typer.testing import CliRunner

from sgn_lab.cli.app import app

runner = CliRunner()


def test_help_lists_measure():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "measure" in result.output


@pytest.mark.parametrize("command", ["measure", "compare"])
def test_every_option_has_its_help_text_as_written(command):
    from sgn_lab.run.config import FIELDS, help_text

    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "[task], [model], [optimizer], [training], [probe], [output]" in text
    assert "Continue the interrupted run in --out" in text
    for flat in ("lr", "beta0", "instruments", "probe_samples"):
        assert " ".join(help_text(flat).split()) in text, flat
    assert len(FIELDS) > 20


def test_short_measure_run_prints_real_numbers(tmp_path, monkeypatch, capsys):
    code, out, _ = run_main(
        monkeypatch, capsys, "measure", "--task", "gaussian-mixture", "--steps", "4",
        "--measure-every", "2", "--probe-samples", "32", "--width", "16", "--device", "cpu",
        "--out", str(tmp_path / "run"),
    )
    assert code == 0
    assert "SGN over training" in out
    assert (tmp_path / "run" / "metrics.csv").is_file()
    # --grads auto: the Gram path, its routes printed once and kept in coverage.csv.
    assert out.count("Gram path, n = 32: routes of the 6 trainable parameters") == 1
    coverage = (tmp_path / "run" / "coverage.csv").read_text()
    assert coverage.startswith("name,route,operations,reason") and "ghost" in coverage


@pytest.mark.parametrize(
    "args, message",
    [
        (["measure", "--task", "nope"], "unknown task 'nope'"),
        (["measure", "--batch-size", "-3"], "config key 'batch_size': input should be greater "
                                            "than or equal to 1, got -3"),
        (["measure", "--device", "tpu"], "config key 'device': input should be 'auto', 'cpu' or "
                                         "'cuda', got 'tpu'"),
        (["measure", "--model", "resnet9000"], "unknown model 'resnet9000'"),
    ],
)
def test_bad_arguments_end_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    code, out, err = run_main(monkeypatch, capsys, *args, "--steps", "1", "--probe-samples", "8",
                              "--out", str(tmp_path / "r"))
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1


def test_unknown_option_is_a_usage_error(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "measure", "--bogus")
    assert code == 2
    assert "--bogus" in err


def test_scaling_quick_sweep_writes_table_and_figure(tmp_path, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "scaling", "--sweep", "sigma", "--quick",
                            "--out", str(tmp_path))
    assert code == 0
    assert "measured ± 95% CI half-width against theory" in out
    for name in ("scaling_sigma.csv", "scaling_sigma.png", "scaling_sigma.pdf"):
        assert (tmp_path / name).stat().st_size > 0


def test_scaling_unknown_sweep_is_named(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "scaling", "--sweep", "gamma",
                            "--out", str(tmp_path))
    assert code == 2 and "unknown sweep 'gamma'" in err


def test_figures_command_makes_the_chosen_figures_from_a_config_folder(
        tmp_path, monkeypatch, capsys):
    # A config folder of one's own: the batch figure with a small sweep.
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "batch.toml").write_text(
        'sweep = "batch"\nseed = 0\n[quick]\nquick_sweep = true\n'
        "[quick.options]\nrepeats = 20\ndraws = 4\n[full]\nquick_sweep = false\n")
    code, _, err = run_main(monkeypatch, capsys, "figures", "--quick", "--only", "batch",
                            "--experiments", str(configs), "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "batch.csv", "batch.pdf", "batch.png", "sweeps"]
    # The sweep's table, kept with its config for a rerun.
    assert sorted(p.name for p in (tmp_path / "out" / "sweeps").iterdir()) == [
        "batch.csv", "batch.json"]


@pytest.mark.parametrize("args, message", [
    (["--only", "spectrum,nope"], "unknown figure 'nope'"),
    (["--only", "tails", "--experiments", "no-such-folder"], "no config for figure 'tails'"),
])
def test_figures_bad_arguments_are_named(tmp_path, monkeypatch, capsys, args, message):
    code, _, err = run_main(monkeypatch, capsys, "figures", *args, "--out", str(tmp_path))
    assert code == 2 and message in err
    assert list(tmp_path.iterdir()) == []


def test_figures_finds_its_configs_from_any_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no experiments/ folder here
    code, out, err = run_main(monkeypatch, capsys, "figures", "--quick", "--only", "batch",
                              "--out", "figs")
    assert code == 0, err
    assert (tmp_path / "figs" / "batch.csv").is_file()
    assert (tmp_path / "figs" / "batch.pdf").is_file()
