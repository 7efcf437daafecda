"""`sgn-lab measure` on files of examples of different lengths (jsonl:PATH): short real runs
with gpt2 (language modelling) and bert (classification), and every bad input ending in one
line that names the file and line, exit code 2, no traceback."""

from __future__ import annotations

import json

import pytest
from helpers import run_main
from padded_helpers import BAD_LINES, SHORT, mixed_records, tokenizer_folder, write_jsonl

import sgn_lab

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--width", "16", "--depth", "1", "--heads", "2", "--method", "sgd", "--lr", "0.1",
        "--batch-size", "4", "--steps", "2", "--measure-every", "2", "--probe-samples", "6",
        "--instruments", "sgn,eval", "--device", "cpu"]


def test_gpt2_on_a_jsonl_file_of_mixed_lengths(tmp_path, monkeypatch, capsys):
    records = mixed_records(16) + [{"text": "the cat sat on the mat and ran up the hill"}]
    path = write_jsonl(tmp_path / "lm.jsonl", records)
    code, out, err = run_main(monkeypatch, capsys, "measure", "--task", f"jsonl:{path}",
                              "--task-options", "context=24,tokens=char,padding=left",
                              "--model", "gpt2", *TINY, "--out", str(tmp_path / "run"))
    assert code == 0, err
    # the long text is cut to the context: said once, on one line
    warning = [line for line in err.splitlines() if "longer than context=24" in line]
    assert len(warning) == 1 and warning[0].startswith(f"warning: {str(path)!r}, line 17: 1 ")
    run = sgn_lab.load_run(tmp_path / "run")
    assert run.metrics["step"].tolist() == [0, 2]
    assert run.metrics[["trace", "train_loss", "test_loss"]].notna().all().all()
    assert run.config["task"]["options"] == {"context": 24, "tokens": "char",
                                             "padding": "left"}


def test_bert_classifies_a_jsonl_file_with_labels(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "cls.jsonl", mixed_records(16))
    code, _, err = run_main(monkeypatch, capsys, "measure", "--task", f"jsonl:{path}",
                            "--task-options", "label_field=label,context=16", "--model", "bert",
                            *TINY, "--out", str(tmp_path / "run"))
    assert code == 0, err
    metrics = sgn_lab.load_run(tmp_path / "run").metrics
    assert metrics["test_accuracy"].between(0, 1).all() and metrics["trace"].notna().all()


def test_a_builtin_model_is_refused_for_padded_tokens(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "cls.jsonl", mixed_records(8))
    code, out, err = run_main(monkeypatch, capsys, "measure", "--task", f"jsonl:{path}",
                              "--task-options", "label_field=label", "--model", "mlp",
                              "--steps", "1", "--batch-size", "2", "--probe-samples", "4",
                              "--out", str(tmp_path / "run"))
    assert code == 2 and "has padded token ids: use bert" in err
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1


def one_line_error(monkeypatch, capsys, tmp_path, task: str, options: str | None = None) -> str:
    args = ["measure", "--task", task, "--model", "gpt2", *TINY, "--out", str(tmp_path / "r")]
    if options:
        args[3:3] = ["--task-options", options]
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err
    return " ".join(err.split())


@pytest.mark.parametrize("case, lines, options, where, words", BAD_LINES,
                         ids=[c[0] for c in BAD_LINES])
def test_bad_lines_end_in_one_line_naming_file_and_line(tmp_path, monkeypatch, capsys, case,
                                                        lines, options, where, words):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    shown = ",".join(f"{k}={v}" for k, v in options.items())
    err = one_line_error(monkeypatch, capsys, tmp_path, f"jsonl:{path}", shown or None)
    assert f"error: {str(path)!r}, {where}: " in err and words in err


def test_a_missing_file_is_one_line(tmp_path, monkeypatch, capsys):
    err = one_line_error(monkeypatch, capsys, tmp_path, f"jsonl:{tmp_path / 'nope.jsonl'}")
    assert f"jsonl file not found: {str(tmp_path / 'nope.jsonl')!r}" in err


def test_unreadable_tokenizer_folders_are_one_line(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", SHORT)
    (tmp_path / "empty").mkdir()
    corrupt = tokenizer_folder(tmp_path / "corrupt")
    (corrupt / "tokenizer.json").write_text("{not json")
    (tmp_path / "plain.txt").write_text("not a folder")
    for folder, words in ((tmp_path / "plain.txt", "no tokenizer folder"),
                          (tmp_path / "missing", "no tokenizer folder"),
                          (tmp_path / "empty", "holds no tokenizer file"),
                          (corrupt, "cannot be read")):
        err = one_line_error(monkeypatch, capsys, tmp_path, f"jsonl:{path}",
                             f"tokenizer={folder}")
        assert f"tokenizer folder {str(folder)!r}" in err or f"{str(folder)!r}" in err
        assert words in err


def test_the_task_help_lists_the_file_tasks(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "measure", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "jsonl:PATH" in text and "hfdata:DIR" in text
    assert "label_field" in text and "padding" in text


def test_invalid_json_names_the_line_and_the_text(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(SHORT[0]), "{oops}"])
    err = one_line_error(monkeypatch, capsys, tmp_path, f"jsonl:{path}")
    assert f"{str(path)!r}, line 2: invalid JSON (" in err and "'{oops}'" in err
