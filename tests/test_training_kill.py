"""``kill -9`` a training run at several points; ``--resume`` (no setting repeated) must end bit-identical to an
uninterrupted run, leave no temporary folder, and keep one metrics record per (kind, step, task). The killed run's
stale lock is taken over by the resume.

Each run is a subprocess that SIGKILLs itself at a chosen point (a driver below), so the kill lands exactly
where it is meant to: mid-epoch, between checkpoints, inside ``save_state``, or between the files of the final
save. A moved and a copied run resume in place.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_iterheads.cli import main

ARGS = ["train", "--task", "polynomial", "--preset", "tiny", "--n-len", "5", "--per-length", "24", "--batch-size", "16",
        "--warmup-steps", "2", "--eval-per-length", "8", "--log-every", "2", "--report-to", "none", "--threads", "1",
        "--max-steps", "14", "--eval-every", "5", "--checkpoint-every", "5"]  # an epoch is 8 batches

DRIVER = r"""
import os, signal, sys
import accelerate
from hf_iterheads.cli import build_parser
from hf_iterheads.training import Callback, resolve_config, train
from hf_iterheads.training.artifacts import prepare_output_dir

point, at = sys.argv[1], int(sys.argv[2])
args = build_parser().parse_args(sys.argv[3:])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

class KillAt(Callback):
    def on_step(self, run):
        if point == "step" and run.step == at:
            die()

if point == "checkpoint":  # inside save_state: the checkpoint is written under its temporary name, not renamed
    save_state = accelerate.Accelerator.save_state
    def dying_save_state(self, output_dir=None, **kw):
        save_state(self, output_dir, **kw)
        if output_dir.endswith(f".tmp_step_{at}"):
            die()
    accelerate.Accelerator.save_state = dying_save_state
if point == "final":  # between the files of the final save: some are in place, the rest in .final-*
    replace, moved = os.replace, []
    def dying_replace(src, dst):
        replace(src, dst)
        if ".final-" in str(src):
            moved.append(dst)
            if len(moved) == at:
                die()
    os.replace = dying_replace
cfg = resolve_config(args)
prepare_output_dir(cfg, resume=False, overwrite=False)
train(cfg, callbacks=[KillAt()])
"""


def _train(*argv: str) -> tuple[int, str]:
    """``hf-iterheads ARGV`` in this process (only the runs that die need a process of their own): (status, stderr).
    The thread count the run sets is restored after it."""
    import contextlib
    import io

    threads, err = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        torch.set_num_threads(threads)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    code, err = _train(*ARGS, "--output-dir", str(out))
    assert code == 0, err[-2000:]
    return out


def _killed(out: Path, point: str, at: int) -> None:
    proc = subprocess.run([sys.executable, "-c", DRIVER, point, str(at), *ARGS, "--output-dir", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL, at the planned point


def _assert_same_run(run: Path, straight: Path) -> None:
    a, b = load_file(straight / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in run.rglob(".*") if p.name.startswith((".final-", ".tmp_step_", ".metrics", ".hf-iterheads.lock"))]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"], r.get("task")) for r in records]
    assert len(keys) == len(set(keys)), keys  # one record per (kind, step, task)
    lines = (straight / "metrics.jsonl").read_text().splitlines()
    reference = [(r["kind"], r["step"], r.get("task")) for r in map(json.loads, lines)]
    assert keys == reference
    final = json.loads((run / "eval_results.json").read_text())
    assert final["results"] == json.loads((straight / "eval_results.json").read_text())["results"]


@pytest.mark.parametrize("point, at, relocate", [
    ("step", 3, None),          # mid-epoch, before the first checkpoint: resumes from step 0
    ("step", 12, "move"),       # mid-epoch 2, between checkpoints 10 and 15; then the folder is moved
    ("checkpoint", 10, "copy"),  # inside save_state of step 10; then the folder is copied
    ("final", 2, None),         # during the final save, two files in place
])
def test_killed_run_resumes_bit_identical(tmp_path, straight, point, at, relocate):
    run = tmp_path / "killed"
    _killed(run, point, at)
    if relocate == "move":
        moved = tmp_path / "elsewhere" / "moved"
        moved.parent.mkdir()
        shutil.move(run, moved)
        run = moved
    elif relocate == "copy":
        original = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
        shutil.copytree(run, tmp_path / "copy")
        run, source = tmp_path / "copy", run
    code, err = _train("train", "--resume", "--output-dir", str(run))
    assert code == 0, err[-2000:]
    _assert_same_run(run, straight)
    if relocate == "move":
        assert not (tmp_path / "killed").exists()  # nothing recreated at the old place
    if relocate == "copy":
        assert {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()} == original


def test_resume_refuses_a_contradicting_option_and_applies_a_longer_run(tmp_path, straight):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    code, err = _train("train", "--resume", "--output-dir", str(run), "--lr", "0.5")
    assert code == 2 and "--lr 0.5 contradicts the run" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, err = _train("train", "--resume", "--output-dir", str(run), "--max-steps", "16", "--threads", "1")
    assert code == 0, err[-2000:]
    assert "resuming with --max-steps 16 instead of 14" in err
    assert json.loads((run / "eval_results.json").read_text())["step"] == 16
    assert json.loads((run / "run_config.json").read_text())["max_steps"] == 16
