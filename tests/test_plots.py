"""``hf-iterheads plot``: emergence curves and attention maps as PNG, and its refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hf_iterheads.cli import main
from hf_iterheads.modeling import build_config, build_model
from hf_iterheads.tokenizer import build_tokenizer, save_tokenizer

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory as training leaves it: a checkpoint and a metrics log (written by hand: no training)."""
    tok = build_tokenizer(model_max_length=13)
    build_model(build_config(tok, 5, "tiny", tasks=["polynomial"])).save_pretrained(tmp_path)
    save_tokenizer(tok, tmp_path)
    records = [{"kind": "train", "step": s, "loss": 3.0 / (1 + s)} for s in (10, 20, 30)]
    records += [{"kind": "eval", "step": s, "task": "polynomial", "accuracy": a, "attn0_peakiness": a, "attn0_mass": a,
                 "attn1_peakiness": a / 2, "attn1_mass": a / 2} for s, a in ((0, 0.0), (15, 0.4), (30, 1.0))]
    records.append({"kind": "solved", "step": 30})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_plot_writes_curves_and_attention_maps(run_dir, capsys):
    assert main(["plot", str(run_dir)]) == 0
    for name in ("curves.png", "attention_maps.png"):
        data = (run_dir / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert "attention_maps.png" in capsys.readouterr().out


def test_plot_curves_only_while_training_runs(run_dir, tmp_path_factory):
    (run_dir / "config.json").unlink()  # no final checkpoint yet
    out = tmp_path_factory.mktemp("pics")
    assert main(["plot", str(run_dir), "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves.png"]


def test_plot_refuses_cleanly(tmp_path, capsys, monkeypatch):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to plot" in err[0] and not (tmp_path / "plots").exists()
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the optional extra were not installed
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'hf-iterheads[plots]'" in err[0]


def test_plot_refuses_lengths_beyond_the_context(run_dir, capsys):
    assert main(["plot", str(run_dir), "--length", "6"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not (run_dir / "plots").exists()  # refused before anything was written
