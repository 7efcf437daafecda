"""The documentation runs as written. Every code block of the README, of each page of the
site and of the benchmarks' README (which the site includes) runs in page order, standing
alone, as a reader pastes it into a fresh folder: Python blocks in one namespace per page,
shell blocks by ``bash -e`` with this environment's ``sgn-lab``, ``python`` and ``torchrun``
first on the PATH, and a block titled ``title="FILE"`` saved as that file first. Those runs
take minutes, so they carry the marker ``docs`` and ``make docs`` runs them (CI runs it after
the fast suite), before building the site with warnings as errors. The few blocks that
cannot run here are listed in :data:`NOT_RUN`, each with its reason, and that list cannot go
stale. The README stays a front door of at most 250 lines, and the troubleshooting page's
index of messages holds what the command line prints."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
         ROOT / "benchmarks" / "README.md"]
SHELLS = ("bash", "sh")
FILE_KINDS = ("toml", "json", "jsonl", "yaml", "text", "python")  # what a title can save

# (page, how the block starts) -> why it is not run. Each entry must match one block.
NOT_RUN: dict[tuple[str, str], str] = {
    ("README.md", "make run "):
        "the quick start: CI runs it on a clean clone (make test), and make run is the main job",
    ("docs/index.md", "make run "): "the quick start, as in the README",
    ("docs/index.md", "python3.11 -m venv .venv\n.venv/bin/pip install torch --index-url"):
        "installs CUDA wheels from the network, for a GPU machine",
    ("docs/development.md", "make test "): "the test suite itself, and make docs runs this test",
    ("docs/guides/distributed.md", "torchrun --standalone --nproc-per-node 2 "
                                   "examples/fsdp_train.py --steps 40 --probe-samples 24 "):
        "run with these settings by tests/distributed/test_examples_torchrun.py",
    ("docs/guides/distributed.md", "torchrun --standalone --nproc-per-node 2 "
                                   "examples/ddp_train.py --steps 40 --probe-samples 24 "):
        "run with these settings by tests/distributed/test_examples_torchrun.py",
    ("benchmarks/README.md", ".venv/bin/pip install --no-deps -r benchmarks/requirements.txt"):
        "installs the peers into the development environment (the dev extra already has them)",
    ("benchmarks/README.md", ".venv/bin/python benchmarks/bench_grads.py --out"):
        "a benchmark (an hour); tests/test_bench_grads.py runs its quick mode",
    ("benchmarks/README.md", ".venv/bin/python benchmarks/bench_gpt2_small.py --methods"):
        "a benchmark; tests/test_bench_gpt2_small.py runs its quick mode",
    ("benchmarks/README.md", ".venv/bin/python benchmarks/bench_distributed.py "):
        "a benchmark; tests/test_bench_distributed.py runs its quick mode",
    ("benchmarks/README.md", ".venv/bin/python benchmarks/bench_fsdp_memory.py "):
        "a benchmark of GPT-2 medium's memory over 1 and 2 processes (minutes, 10 GiB)",
    ("benchmarks/README.md", ".venv/bin/python benchmarks/bench_branches.py "):
        "a benchmark (minutes; its quick mode, a minute)",
}


@dataclass(frozen=True)
class Block:
    lang: str
    title: str | None
    text: str
    number: int



FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)


def code_blocks(text: str) -> list[Block]:
    blocks = []
    for number, (lang, attributes, body) in enumerate(FENCE.findall(text), start=1):
        title = re.search(r'title="([^"]+)"', attributes)
        blocks.append(Block(lang, title and title.group(1), body, number))
    return blocks


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def not_run(page: Path, block: Block) -> list[tuple[str, str]]:
    return [key for key in NOT_RUN if key[0] == name(page) and block.text.startswith(key[1])]


def runnable(page: Path, block: Block) -> bool:
    return (block.title is not None or block.lang in ("python", *SHELLS)) and \
        not not_run(page, block)


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "```bash\nmake run" in text and "make test" in text
    assert not re.search(r"(THEORY|DESIGN)\.md", text)


def test_every_exception_names_a_block_and_every_file_has_a_title():
    matched = [key for p in PAGES for b in code_blocks(p.read_text()) for key in not_run(p, b)]
    assert sorted(matched) == sorted(NOT_RUN), "each NOT_RUN entry must match one block"
    for page in PAGES:
        for block in code_blocks(page.read_text()):
            if block.lang in ("toml", "json", "jsonl", "yaml"):   # a file: say which
                assert block.title, f"{name(page)} block {block.number}: a {block.lang} " \
                                    "block needs title=\"FILE\""
            assert block.title is None or block.lang in FILE_KINDS, block


def run_page(page: Path, folder: Path) -> None:
    """Every block of ``page`` in order, in ``folder``: files saved, Python executed in one
    namespace, shell blocks by bash with this environment first on the PATH."""
    (folder / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    namespace: dict = {"__name__": "docs"}
    for block in code_blocks(page.read_text()):
        if not runnable(page, block):
            continue
        where = f"{name(page)} block {block.number}"
        if block.title:
            (folder / block.title).write_text(block.text, encoding="utf-8")
        elif block.lang == "python":
            try:
                code = compile(block.text, where, "exec", dont_inherit=True)  # no __future__
                exec(code, namespace)
            except Exception as exc:  # name the block: a reader sees which snippet broke
                pytest.fail(f"{where} fails: {type(exc).__name__}: {exc}\n{block.text}")
        else:
            done = subprocess.run(["bash", "-e", "-c", block.text], cwd=folder, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{where} fails:\n{block.text}\n{done.stderr[-3000:]}"


@pytest.mark.docs  # minutes: `make docs` runs these, after the fast suite in CI
@pytest.mark.parametrize("page", [p for p in PAGES
                                  if any(runnable(p, b) for b in code_blocks(p.read_text()))],
                         ids=name)
def test_every_block_runs_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_page(page, tmp_path)


@functools.cache  # one parse of the source for the four tests below
def error_templates() -> list[re.Pattern]:
    """The troubleshooting page's index of messages, each as a pattern ({...}: any value)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    lines = [line for line in hooks.error_index().splitlines()
             if line and not line.startswith(("#", "```"))]
    return [re.compile(".*".join(re.escape(part) for part in re.split(r"\{[^{}]*\}", line)))
            for line in lines]


@pytest.mark.parametrize("args", [
    ["measure", "--task", "no-such-task", "--out", "run"],
    ["measure", "--out", "no-such-folder", "--resume"],
    ["figures", "--only", "no-such-figure", "--quick"],
    ["scaling", "--sweep", "no-such-sweep"],
], ids=lambda args: args[0] + " " + args[2])
def test_the_troubleshooting_index_holds_the_errors_a_user_meets(args, tmp_path):
    done = subprocess.run([sys.executable, "-m", "sgn_lab.cli", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    message = " ".join(done.stderr.removeprefix("error: ").split())  # as one line, unwrapped
    assert any(t.fullmatch(message) for t in error_templates()), message
