"""The README's and the tutorial's commands run as written, at a reduced size.

Every fenced ``bash`` block of ``README.md`` and ``docs/tutorial.md`` is read line by line; the shell itself splits
each command into arguments (so quoting is exactly what a user's shell does), ``pip install`` parts and the test
suite itself are left out, and each ``hf-iterheads`` command runs in-process in a fresh folder, in the order of
the page, with flags that shrink it (fewer steps, probes and sequences; all documented in ``--help``). Commands
that need the network (a Hub model id) or hours (``reproduce``: its smoke scale runs in test_reproduce.py) are
parsed by the real argument parser instead, so a renamed flag still fails here. The ``python`` blocks run too,
after the commands before them; a block whose first line is ``# NAME.py`` is written to that file instead.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TUTORIAL = ROOT / "docs" / "tutorial.md"

FIRST_COMMAND = ('pip install "torch==2.13.0" -e ".[plots]" && hf-iterheads detect polynomial-cot --task polynomial '
                 "--ablate --output-dir runs/detect-polynomial-cot")
TEST_COMMAND = 'pip install "torch==2.13.0" -e ".[test]" && python -m pytest -q'

# flags appended to each command (argparse keeps the last value of a flag given twice)
SMALLER = {
    "train": ["--preset", "tiny", "--n-len", "6", "--max-steps", "8", "--eval-every", "4", "--eval-per-length", "8",
              "--per-length", "8", "--checkpoint-every", "4", "--report-to", "none", "--threads", "1"],
    "detect": ["--n", "8", "--lengths", "4-6"],
    "scan": ["--n", "8", "--lengths", "4-6"],
    "eval": ["--per-length", "8"],
    "build-datasets": ["--n-len", "6", "--per-length", "16"],
    "plot": [],
}
PARSE_ONLY = {"reproduce", "release"}  # hours of training; a Hub upload
SKIPPED = (re.compile(r"^pip\s"), re.compile(r"^python -m pytest\b"), re.compile(r"^mkdocs\b"))


def blocks(page: Path) -> list[tuple[str, str]]:
    """The fenced code blocks of a page, in order: (language, text)."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", page.read_text(), re.M | re.S)]


def commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, blank and comment lines left out."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def argv_of(command: str) -> list[str]:
    """The arguments after ``hf-iterheads``, split by bash itself (quotes, $'...', trailing comments)."""
    shell = re.sub(r"(^|\s)hf-iterheads(\s)", r"\1printf '%s\\0'\2", command, count=1)
    out = subprocess.run(["bash", "-c", shell], capture_output=True, check=True).stdout.decode()
    return out.split("\0")[:-1]


def needs_network(argv: list[str], cwd: Path) -> bool:
    """A model argument that is a Hub id here: not a bundled checkpoint, not a folder the page made."""
    from hf_iterheads.modeling import bundled_path

    sub = argv[0]
    if sub not in ("detect", "scan"):
        return False
    models = []
    for arg in argv[1:]:
        if arg.startswith("-"):
            break
        models.append(arg.split("@")[0])
    return any(bundled_path(model) is None and not (cwd / model).exists() for model in models)


def run_page(page: Path, cwd: Path) -> list[str]:
    """Run every block of ``page`` in ``cwd``; returns what was only parsed, for the report."""
    from hf_iterheads.cli import build_parser, main

    parsed_only = []
    for lang, text in blocks(page):
        if lang == "python":
            first = text.splitlines()[0].strip()
            if re.fullmatch(r"#\s*[\w.]+\.py", first):
                (cwd / first.lstrip("#").strip()).write_text(text)
                continue
            exec(compile(text, f"{page.name}:python", "exec"), {"__name__": "__docs__"})
            continue
        if lang != "bash":
            continue
        for command in commands(text):
            parts = [p.strip() for p in command.split("&&")]
            parts = [p for p in parts if not any(s.match(p) for s in SKIPPED)]
            for part in parts:
                assert re.match(r"^([A-Z_]+=\S+\s+)*hf-iterheads\s", part), f"{page.name}: a command this test cannot run: {part}"
                argv = argv_of(part)
                if argv[0] in PARSE_ONLY or needs_network(argv, cwd):
                    build_parser().parse_args(argv)  # SystemExit (a test failure) on an unknown flag or value
                    parsed_only.append(part)
                    continue
                assert argv[0] in SMALLER, f"{page.name}: no reduced size known for `hf-iterheads {argv[0]}`: {part}"
                assert main(argv + SMALLER[argv[0]]) == 0, f"{page.name}: failed: {part}"
    return parsed_only


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # `--task my_tasks:affine7` and python blocks import from here
    yield tmp_path
    sys.modules.pop("my_tasks", None)


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    bash = [(i, text) for i, (lang, text) in enumerate(blocks(README)) if lang == "bash"]
    assert commands(bash[0][1]) == [FIRST_COMMAND]
    assert commands(bash[1][1]) == [TEST_COMMAND]
    assert next(n for n, line in enumerate(lines, 1) if line == FIRST_COMMAND) < 30
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND.replace("pip install", "pip install -q") in ci, ".ci/run runs the README's test command (quietly)"


def test_readme_headline_matches_the_reproduction():
    results = json.loads((ROOT / "docs" / "reproduction" / "results.json").read_text())
    table = [line for line in README.read_text().splitlines() if line.startswith("| ") and "**" in line]
    assert len(table) == len(results["findings"])
    for row, finding in zip(table, results["findings"]):
        assert f"**{finding['verdict']}**" in row, (row, finding["verdict"])


@pytest.mark.skipif(shutil.which("bash") is None, reason="the commands are split by bash")
def test_readme_commands_run(sandbox):
    parsed_only = run_page(README, sandbox)
    assert (sandbox / "runs" / "detect-polynomial-cot" / "scores.json").is_file()
    assert (sandbox / "runs" / "poly" / "plots" / "curves.png").is_file()
    assert (sandbox / "runs" / "affine7" / "model.safetensors").is_file()
    assert any(p.startswith("hf-iterheads reproduce") for p in parsed_only)


@pytest.mark.skipif(shutil.which("bash") is None, reason="the commands are split by bash")
def test_tutorial_commands_run(sandbox):
    run_page(TUTORIAL, sandbox)
    scores = json.loads((sandbox / "runs" / "poly-causal" / "scores.json").read_text())
    assert scores["ablation"] and scores["patch"]
    assert (sandbox / "runs" / "poly-eval.json").is_file()
