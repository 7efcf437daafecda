"""The README's Python snippets run as written, in order, in one namespace (as a reader pastes
them into one session), in a fresh working directory."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_has_python_snippets():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    assert any("load_runs" in b for b in blocks) and any("NoiseProbe" in b for b in blocks)


def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for index, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as exc:  # name the block: a reader sees which snippet broke
            pytest.fail(f"README python block {index + 1} fails: {type(exc).__name__}: {exc}\n"
                        f"{block}")
    # What the snippets claim about the run layer.
    assert namespace["config"].resolved().run_name == "pnm-beta0=2-s0"
    metrics = namespace["metrics"]
    assert sorted(metrics["label"].unique()) == ["pnm-beta0=0.5", "sgd"]
    assert sorted(metrics["run"].unique()) == ["pnm-beta0=0.5-s0", "pnm-beta0=0.5-s1",
                                               "sgd-s0", "sgd-s1"]
    assert {"noise_scale_se", "task", "model"} <= set(metrics.columns)
    assert len(namespace["rows"]) == 3 and "grad_norm" in namespace["rows"][0]


# Small sizes appended to each command line (a repeated option takes its last value), so the
# README's commands run as written in seconds.
SMALL_FLAGS = ["--steps", "4", "--measure-every", "2", "--probe-samples", "16",
               "--batch-size", "8", "--update-repeats", "2", "--device", "cpu"]


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = re.compile(r"^#{2,3} ", re.MULTILINE).search(text, start + len(heading))
    return text[start:following.start()] if following else text[start:]


def command_lines(block: str) -> list[str]:
    return [line for line in block.replace("\\\n", " ").splitlines()
            if line.strip().startswith("sgn-lab ")]


def test_readme_command_lines_for_your_own_code_run(tmp_path, monkeypatch, capsys):
    """The commands of "From the command line", with the files they name written first: the
    module shown (its first line names it) and a small text file."""
    import json
    import shlex

    from helpers import run_main

    text = section(README.read_text(), "### From the command line")
    monkeypatch.chdir(tmp_path)
    for block in python_blocks(text):
        first = block.splitlines()[0]
        if first.startswith("# ") and first.split()[1].endswith(".py"):
            (tmp_path / first.split()[1]).write_text(block)
    (tmp_path / "notes.txt").write_text("a few lines of notes, of any kind at all.\n" * 30)
    reviews = [{"text": "good " * (1 + i % 7) + "film", "stars": i % 5} for i in range(40)]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = [c for b in re.findall(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
                for c in command_lines(b)]
    assert len(commands) >= 3 and any("mymodels:" in c for c in commands)
    for command in commands:
        args = shlex.split(command)[1:]
        code, out, err = run_main(monkeypatch, capsys, *args, *SMALL_FLAGS)
        assert code == 0, f"{command}\n{err}"
        out_dir = tmp_path / args[args.index("--out") + 1]
        assert (out_dir / "metrics.csv").is_file()
