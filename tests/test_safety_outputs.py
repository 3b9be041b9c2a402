"""No command deletes or changes what it did not make.

``--overwrite`` replaces only a folder the same command wrote (its marker, or its layout) or an empty one, never
an input of the command; ``-o`` never writes inside an input; a replacement is built beside the old folder and
swapped in, so a failure leaves the old one whole; a SIGTERM mid-build leaves no hidden temporary folder.
Every case snapshots the folders it may touch and asserts they are unchanged.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_iterheads.cli import main
from hf_iterheads.errors import IterHeadsError
from hf_iterheads.outputs import OUTPUT_MARKER, atomic_output_dir, check_not_input, clean_stale_siblings
from tests.test_bad_inputs import snapshot

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "hf_iterheads" / "checkpoints" / "polynomial-cot"
SMALL_DATA = ["--tasks", "parity", "--n-len", "3", "--per-length", "4"]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finished training run as ``train`` leaves it: checkpoint files, ``run_config.json``, metrics, checkpoints/."""
    from hf_iterheads.training import TrainConfig

    run = tmp_path / "run"
    shutil.copytree(BUNDLED, run, copy_function=os.link)
    TrainConfig(tasks=["polynomial"], output_dir=str(run), max_steps=2).save(run / "run_config.json")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "checkpoints" / "step_1" / "trainer_state.json").write_text('{"step": 1, "elapsed": 0.1}\n')
    return run


def refused(argv: list[str], expected: str, keep: Path, capsys) -> str:
    """``hf-iterheads ARGV`` exits 2 with one line holding ``expected`` and leaves everything under ``keep`` as it was."""
    before = snapshot(keep)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]  # after a progress bar, if the work had started
    assert "Traceback" not in err and line.startswith(f"hf-iterheads {argv[0]}: error: ") and expected in line, err
    assert snapshot(keep) == before
    return line


# --- the data-loss cases -------------------------------------------------------------------------------------


def test_train_never_overwrites_its_own_init_from(run_dir, tmp_path, capsys):
    base = ["train", "--task", "parity", "--max-steps", "2", "--report-to", "none", "--init-from", str(run_dir)]
    refused([*base, "--output-dir", str(run_dir), "--overwrite"], "is the --init-from", tmp_path, capsys)
    refused([*base, "--output-dir", str(run_dir / "transfer")], "inside the --init-from", tmp_path, capsys)
    refused([*base, "--output-dir", str(tmp_path), "--overwrite"], "holds the --init-from", tmp_path, capsys)


def test_release_dry_run_never_replaces_the_checkpoint(run_dir, tmp_path, capsys):
    base = ["release", "--repo-id", "acme/x", "--dry-run", "--overwrite"]
    refused([*base, "--checkpoint", str(run_dir), "--output-dir", str(run_dir)], "is the --checkpoint", tmp_path, capsys)
    refused([*base, "--checkpoint", str(run_dir), "--output-dir", str(run_dir / "rel")], "inside the --checkpoint",
            tmp_path, capsys)
    # not its input, but not a dry run's folder either: a run is never replaced by a release folder
    refused([*base, "--checkpoint", "polynomial-cot", "--output-dir", str(run_dir)], "not written by hf-iterheads release",
            tmp_path, capsys)


def test_release_dry_run_replaces_its_own_folder(tmp_path, capsys):
    out = tmp_path / "rel"
    argv = ["release", "--repo-id", "acme/x", "--dry-run", "--checkpoint", "polynomial-cot", "--output-dir", str(out)]
    assert main(argv) == 0
    assert (out / OUTPUT_MARKER).is_file()
    (out / "README.md").write_text("edited")
    assert main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    assert (out / "README.md").read_text() != "edited"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel"]  # the old folder is gone, nothing hidden is left


def test_build_datasets_never_replaces_a_checkpoint(run_dir, tmp_path, capsys):
    argv = ["build-datasets", "--output-dir", str(run_dir), "--overwrite", *SMALL_DATA]
    refused(argv, "not written by hf-iterheads build-datasets", tmp_path, capsys)


def test_commands_refuse_each_others_folders(tmp_path, capsys):
    data, rel = tmp_path / "data", tmp_path / "rel"
    assert main(["build-datasets", "--output-dir", str(data), *SMALL_DATA]) == 0
    assert main(["release", "--repo-id", "acme/x", "--dry-run", "--output-dir", str(rel)]) == 0
    refused(["release", "--repo-id", "acme/x", "--dry-run", "--overwrite", "--output-dir", str(data)],
            "it was written by hf-iterheads build-datasets", tmp_path, capsys)
    refused(["build-datasets", "--overwrite", "--output-dir", str(rel), *SMALL_DATA],
            "it was written by hf-iterheads release", tmp_path, capsys)
    refused(["train", "--task", "parity", "--max-steps", "2", "--output-dir", str(data), "--overwrite"],
            "does not look like a training run", tmp_path, capsys)


def test_eval_output_never_goes_inside_an_input(run_dir, tmp_path, capsys):
    base = ["eval", str(run_dir), "--task", "polynomial", "--lengths", "4", "--per-length", "4"]
    refused([*base, "-o", str(run_dir / "config.json")], "inside the evaluated model", tmp_path, capsys)
    refused([*base, "-o", str(run_dir / "eval.json")], "inside the evaluated model", tmp_path, capsys)
    refused(["eval", "polynomial-cot", "--task", "polynomial", "-o", str(BUNDLED / "eval.json")],
            "inside the evaluated model", BUNDLED, capsys)
    data = tmp_path / "data"
    assert main(["build-datasets", "--output-dir", str(data), "--tasks", "polynomial", "--n-len", "4", "--per-length", "4"]) == 0
    refused([*base, "--dataset", str(data), "-o", str(data / "polynomial" / "eval.json")], "inside the --dataset",
            tmp_path, capsys)


def test_check_not_input_skips_hub_ids_and_missing_paths(tmp_path):
    check_not_input(tmp_path / "out", {"--init-from": "acme/model", "--dataset": None, "x": tmp_path / "nope"})
    with pytest.raises(IterHeadsError, match="is the model"):
        check_not_input(tmp_path, {"model": tmp_path})


# --- replacement is atomic -------------------------------------------------------------------------------------


def test_a_failed_rebuild_keeps_the_old_folder(tmp_path, monkeypatch, capsys):
    import hf_iterheads.dataset_builder as builder

    out = tmp_path / "data"
    assert main(["build-datasets", "--output-dir", str(out), "--tasks", "parity,binary_copy", "--n-len", "3",
                 "--per-length", "4"]) == 0
    real, calls = builder.build_dataset, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise IterHeadsError("the disk filled up")
        return real(*args, **kwargs)

    monkeypatch.setattr(builder, "build_dataset", second_fails)
    refused(["build-datasets", "--output-dir", str(out), "--tasks", "parity,binary_copy", "--n-len", "4",
             "--per-length", "4", "--overwrite"], "the disk filled up", tmp_path, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_stale_temporary_folders_of_dead_processes_are_cleaned(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    dead, live = tmp_path / f".out.tmp-{gone.pid}-abc", tmp_path / f".out.tmp-{os.getpid()}-xyz"
    for d in (dead, live):
        d.mkdir()
        (d / "half.parquet").write_text("")
    clean_stale_siblings(out)
    assert not dead.exists() and live.exists()  # a live writer's folder is never touched
    with atomic_output_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"


def test_sigterm_mid_build_leaves_no_hidden_folder(tmp_path):
    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, str(ROOT / "dataset_scripts" / "build_datasets.py"), "--output-dir", str(out),
                             "--per-length", "4096", "--n-len", "16"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".data.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".data.tmp-*")), "the build never started writing"
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


# --- the datasets cache never answers for another folder -----------------------------------------------------


def test_two_folders_named_alike_load_their_own_rows(tmp_path):
    """``datasets`` caches a local folder by its base name, config name and card: two ``hub`` folders with other
    rows must still load their own (the cards name their files' sha256), and the cache used is the session's."""
    import datasets.config
    from datasets import Dataset, load_dataset

    from hf_iterheads.dataset_builder import write_dataset_folder
    from tests.conftest import PRIVATE_HF

    a, b = tmp_path / "a" / "hub", tmp_path / "b" / "hub"
    write_dataset_folder(a, ["parity"], n_len=12, per_length=4, seed=0)  # same sizes, same card but the seed:
    write_dataset_folder(b, ["parity"], n_len=12, per_length=4, seed=1)  # only the rows differ
    for folder in (a, b, a):
        loaded = load_dataset(str(folder), "parity", split="train")["inputs"]
        assert loaded == Dataset.from_parquet(str(folder / "parity" / "train-00000-of-00001.parquet"))["inputs"]
    assert Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(PRIVATE_HF)
