"""One writer per folder: a run or a scan folder in use by a live process refuses a second ``train``, ``--resume``,
``--overwrite`` or ``scan``; a lock left by a killed process is stale and taken over; the lock goes on exit.

Most cases hold the lock for a live helper process (``sleep``), which is what a running ``train`` looks like from
outside; one case runs a real training process beside the command.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hf_iterheads.cli import main
from hf_iterheads.errors import IterHeadsError
from hf_iterheads.outputs import LOCK_NAME, _start_time, folder_lock
from tests.test_bad_inputs import snapshot

TINY = ["--preset", "tiny", "--n-len", "4", "--per-length", "16", "--batch-size", "8", "--warmup-steps", "1",
        "--eval-per-length", "4", "--report-to", "none", "--threads", "1"]


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The PID of a live process of this host (stopped at the end)."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc.pid
    proc.kill()
    proc.wait()


def hold(folder: Path, pid: int, host: str | None = None) -> Path:
    """Write ``folder``'s lock as process ``pid`` holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "start": _start_time(pid)}))
    return lock


@pytest.fixture
def stored_run(tmp_path) -> Path:
    """A run folder with its settings, as ``train`` leaves it after a first checkpoint."""
    from hf_iterheads.training import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(tasks=["parity"], output_dir=str(run), max_steps=2).save(run / "run_config.json")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    return run


def refused(argv: list[str], keep: Path, capsys, expected: str = "is in use by process") -> str:
    before = snapshot(keep)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert snapshot(keep) == before
    return err


# --- the lock itself -----------------------------------------------------------------------------------------


def test_lock_is_taken_released_and_nested(tmp_path):
    folder = tmp_path / "a" / "b"
    with folder_lock(folder):
        owner = json.loads((folder / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with folder_lock(folder):  # the same process again: fine
            pass
        assert (folder / LOCK_NAME).is_file()
    assert list(tmp_path.iterdir()) == []  # the lock is gone, and so are the folders it created and left empty


def test_a_live_lock_refuses_and_leaves_the_folder(tmp_path, live_pid):
    lock = hold(tmp_path / "run", live_pid)
    with pytest.raises(IterHeadsError, match=f"in use by process {live_pid} on {socket.gethostname()}"):
        with folder_lock(tmp_path / "run"):
            pass
    assert json.loads(lock.read_text())["pid"] == live_pid


def test_a_lock_of_another_host_is_respected(tmp_path):
    hold(tmp_path / "run", 1, host="another-machine")
    with pytest.raises(IterHeadsError, match="on another-machine"):
        with folder_lock(tmp_path / "run"):
            pass


def test_a_stale_lock_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = hold(tmp_path / "run", gone.pid)
    with folder_lock(tmp_path / "run"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_reused_pid_is_not_the_owner(tmp_path, live_pid):
    lock = tmp_path / "run" / LOCK_NAME
    hold(tmp_path / "run", live_pid)
    lock.write_text(json.dumps({**json.loads(lock.read_text()), "start": "1"}))  # an earlier process with that PID
    with folder_lock(tmp_path / "run"):
        pass
    assert not lock.exists()


# --- train and scan refuse a folder in use ---------------------------------------------------------------------


def test_train_refuses_a_run_in_use(stored_run, tmp_path, capsys, live_pid):
    hold(stored_run, live_pid)
    base = ["train", "--task", "parity", "--max-steps", "2", "--report-to", "none", "--output-dir", str(stored_run)]
    refused(["train", "--resume", "--output-dir", str(stored_run)], tmp_path, capsys)
    refused([*base, "--overwrite"], tmp_path, capsys)
    empty = tmp_path / "empty"
    hold(empty, live_pid)
    refused(["train", "--task", "parity", "--max-steps", "2", "--output-dir", str(empty)], tmp_path, capsys)


def test_scan_refuses_a_folder_in_use(tmp_path, capsys, live_pid):
    hold(tmp_path / "atlas", live_pid)
    refused(["scan", "polynomial-cot", "--tasks", "parity", "--n", "2", "--lengths", "4", "--output-dir",
             str(tmp_path / "atlas")], tmp_path, capsys)


def test_resume_beside_a_running_training_is_refused(tmp_path, capsys):
    """The real case: ``train`` runs in another process; ``--resume`` and ``--overwrite`` are refused; SIGTERM ends
    that process cleanly and releases the lock."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "hf_iterheads.cli", "train", "--task", "parity", "--output-dir",
                             str(run), "--max-steps", "100000", "--eval-every", "100000", *TINY],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "run_config.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (run / "run_config.json").is_file(), "training never started"
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid
        capsys.readouterr()
        assert main(["train", "--resume", "--output-dir", str(run)]) == 2
        assert f"in use by process {proc.pid}" in capsys.readouterr().err
        assert main(["train", "--task", "parity", "--output-dir", str(run), "--overwrite", *TINY]) == 2
        assert f"in use by process {proc.pid}" in capsys.readouterr().err
        assert (run / "run_config.json").is_file()
        proc.terminate()
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert not (run / LOCK_NAME).exists()


def test_reproduce_refuses_a_folder_in_use(tmp_path, capsys, live_pid):
    repro = tmp_path / "repro"
    repro.mkdir()
    (repro / "reproduce.json").write_text('{"scale": "smoke"}\n')
    hold(repro, live_pid)
    refused(["reproduce", "--smoke", "--output-dir", str(repro)], tmp_path, capsys)
    refused(["reproduce", "--quick", "--overwrite", "--output-dir", str(repro)], tmp_path, capsys)
