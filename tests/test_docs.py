"""The documentation: every Python block of the README and of each page of the site runs as
written (a page's blocks in order, in one fresh namespace and a fresh working directory, as a
reader pastes them into one session), the README's shell recipes run as written (in a fresh
folder, the repository's examples beside them), and the README stays a front door of at most
250 lines. The site itself is built with warnings as errors by ``make docs`` in CI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "```bash\nmake run" in text and "make test" in text
    assert not re.search(r"(THEORY|DESIGN)\.md", text)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text())],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs"}
    for index, block in enumerate(python_blocks(page.read_text())):
        try:
            code = compile(block, f"{page.name} python block {index + 1}", "exec",
                           dont_inherit=True)  # not this file's __future__ annotations
            exec(code, namespace)
        except Exception as exc:  # name the block: a reader sees which snippet broke
            pytest.fail(f"{page.name} python block {index + 1} fails: "
                        f"{type(exc).__name__}: {exc}\n{block}")


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_shell_recipes_run_as_written(tmp_path):
    """Every bash block of the README but the quick start's ``make run`` / ``make test``
    (the main job, and what CI runs), with this environment's ``sgn-lab``, ``python`` and
    ``torchrun`` first on the PATH."""
    blocks = shell_blocks((ROOT / "README.md").read_text())
    recipes = [b for b in blocks if not b.startswith("make ")]
    assert len(recipes) == len(blocks) - 1 >= 4
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for block in recipes:
        done = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
