"""Releasing checkpoints: the dry-run folder is exactly what is uploaded, and it loads by repo id offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_iterheads.cli import main
from hf_iterheads.modeling import bundled_checkpoints
from hf_iterheads.outputs import OUTPUT_MARKER
from hf_iterheads.paper.release import RELEASE_FILES
from tests.conftest import lay_into_hub_cache

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--n-len", "5", "--per-length", "24", "--batch-size", "16", "--warmup-steps", "2",
        "--eval-per-length", "8", "--eval-every", "4", "--report-to", "none", "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "parity"
    assert main(["train", "--task", "parity", "--output-dir", str(out), "--max-steps", "4", *TINY]) == 0
    return out


def test_dry_run_writes_exactly_the_release_folder(run, tmp_path):
    out = tmp_path / "release"
    assert main(["release", "--repo-id", "acme/tiny-parity", "--checkpoint", str(run), "--dry-run", "--output-dir", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert OUTPUT_MARKER in names  # a later --overwrite knows the folder is a dry run's
    names.remove(OUTPUT_MARKER)
    assert set(names) <= set(RELEASE_FILES) | {p.name for p in run.glob("*.png")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(names)
    assert not any(n.endswith((".bin", ".pt")) for n in names) and "checkpoints" not in names  # no training state
    assert (out / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


def test_released_folder_loads_by_repo_id_offline_and_is_detectable(run, tmp_path, hub_cache):
    out = tmp_path / "release"
    assert main(["release", "--repo-id", "acme/tiny-parity", "--checkpoint", str(run), "--dry-run", "--output-dir", str(out)]) == 0
    lay_into_hub_cache(out, "acme/tiny-parity", hub_cache)
    model = AutoModelForCausalLM.from_pretrained("acme/tiny-parity")
    tok = AutoTokenizer.from_pretrained("acme/tiny-parity")
    reference = AutoModelForCausalLM.from_pretrained(run)
    ids = tok("<parity> 1 0 1 <eoi> 1 1 0 <eos>", return_tensors="pt")["input_ids"]
    assert torch.equal(model(ids).logits, reference(ids).logits)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    det = subprocess.run(
        [sys.executable, "-m", "hf_iterheads.cli", "detect", "acme/tiny-parity", "--task", "parity", "--lengths", "4-5",
         "--n", "8", "--output-dir", str(tmp_path / "det")],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )
    assert det.returncode == 0, det.stderr
    assert (tmp_path / "det" / "scores.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--repo-id", "not-a-repo-id", "--dry-run", "--output-dir", "X"], "ORG/NAME"),
        (["--repo-id", "acme/x", "--checkpoint", "no-such-checkpoint", "--dry-run", "--output-dir", "X"], "neither a checkpoint"),
        (["--repo-id", "acme/x", "--dry-run"], "--output-dir"),
    ],
)
def test_bad_release_input_is_one_line(args, message, tmp_path, capsys):
    args = [str(tmp_path / "out") if a == "X" else a for a in args]
    assert main(["release", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_pickled_weights_are_never_released(run, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "pytorch_model.bin").write_bytes(b"pickle")
    assert main(["release", "--repo-id", "acme/x", "--checkpoint", str(bad), "--dry-run", "--output-dir", str(tmp_path / "o")]) == 2
    assert "pickled weights" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_bundled_checkpoints_are_complete_release_folders():
    for name in bundled_checkpoints():
        folder = ROOT / "hf_iterheads" / "checkpoints" / name
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= {
            p.name for p in folder.iterdir()
        }, name
        AutoModelForCausalLM.from_pretrained(folder)


def test_bundled_model_cards_are_built_from_their_sources():
    from hf_iterheads.paper.release import NOTES_MARK, release_card

    sources = sorted(p for p in (ROOT / "model_cards").glob("*.md") if p.name != "model_card_template.md")
    assert {p.stem for p in sources} == set(bundled_checkpoints())
    for notes in sources:
        folder = ROOT / "hf_iterheads" / "checkpoints" / notes.stem
        card = (folder / "README.md").read_text()
        assert NOTES_MARK.format(name=notes.stem) in card and "## Mechanism found" in card and "## Limitations" in card
        assert card == release_card(folder, notes), f"{notes.stem}: run python model_cards/build_cards.py"
