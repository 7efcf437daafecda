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
