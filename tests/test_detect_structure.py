"""The detector engine stays readable: small modules and functions, no import cycle, a torch-free CLI parser."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

DETECT = Path(__file__).resolve().parents[1] / "hf_iterheads" / "detect"
ENGINE = ("detection", "loading", "runner", "batching", "scoring", "sequential", "result", "detector", "cli", "criteria", "gating",
          "probes", "prompts", "attention", "rows", "competence", "circuits", "patterns", "ablation")


def _imports(path: Path) -> set[str]:
    """Sibling modules of detect/ that ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
    return found


def test_no_import_cycle_through_the_engine():
    graph = {p.stem: _imports(p) & {q.stem for q in DETECT.glob("*.py")} for p in DETECT.glob("*.py")}

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
        return seen

    cycles = [m for m in ENGINE if m in reach(m)]
    assert not cycles, f"import cycles through {cycles}"


def test_engine_modules_and_functions_are_small():
    for path in sorted(DETECT.glob("*.py")):  # the engine and everything beside it in detect/
        name = path.stem
        text = path.read_text()
        assert len(text.splitlines()) <= 400, f"{name}.py has {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                assert size <= 60, f"{name}.{node.name} has {size} lines"


def test_detect_parser_imports_no_torch():
    code = ("import sys, argparse\nfrom hf_iterheads.detect.cli import add_cli\n"
            "p = argparse.ArgumentParser(); add_cli(p.add_subparsers())\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_old_import_paths_still_work():
    from hf_iterheads.detect import detection, detector, result, scoring

    assert detection.DetectionResult is result.DetectionResult
    assert detection.IterationHeadDetector is detector.IterationHeadDetector
    assert detection.score_heads is scoring.score_heads
    for name in ("detect_iteration_heads", "write_outputs", "add_cli", "load_model", "MIN_SCORE", "capture_runner",
                 "attention_pattern", "check_causal", "context_length", "_StopForward", "_Accumulator"):
        assert hasattr(detection, name), name
    from hf_iterheads.detect import atlas, atlas_hub

    assert atlas.publish is atlas_hub.publish  # the Hub upload moved beside the atlas


def test_threads_option_sets_torch_threads_and_refuses_zero():
    import argparse

    import pytest
    import torch

    from hf_iterheads.detect.cli import add_cli, apply_threads
    from hf_iterheads.errors import IterHeadsError

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["detect", "m", "--threads", "1", "--full-n", "--output-dir", "o"])
    assert args.threads == 1 and args.full_n
    before = torch.get_num_threads()
    try:
        apply_threads(args.threads)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(IterHeadsError, match="--threads must be at least 1"):
        apply_threads(0)
