"""report.html: self-contained, small for a 12 x 12 model, the circuit's cells outlined, and rendered by a real
browser (headless Chromium: a screenshot that is not blank and the expected headings in the DOM)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from hf_iterheads.detect.detection import detect_iteration_heads, write_outputs
from hf_iterheads.detect.html import expected_cells, head_maps, page, section
from hf_iterheads.tokenizer import build_tokenizer

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A random 12-layer x 12-head GPT-2 (tiny width), detected on 16-step probes, with its report."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        GPT2Config(
            n_layer=12,
            n_head=12,
            n_embd=48,
            n_positions=64,
            vocab_size=64,
            initializer_range=0.3,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )
    ).eval()
    tok = build_tokenizer()
    result = detect_iteration_heads(model, tok, task="parity", lengths="12-16", n=8, ablate=True)
    out = tmp_path_factory.mktemp("report") / "detect"
    write_outputs(result, out)
    return model, tok, result, out


def test_detect_writes_a_small_self_contained_report(big):
    model, tok, result, out = big
    text = (out / "report.html").read_text()
    assert (out / "report.html").stat().st_size < 2_000_000  # the size bound for a 12 x 12 model
    assert re.search(r"<(script|link|img)[^>]*\b(src|href)=", text) is None  # nothing fetched
    assert "https://" not in text.replace("https://arxiv.org/abs/2406.02128", "")
    for heading in ("Heatmaps (layer x head)", "Attention of the top heads", "Ablation"):
        assert f"<h3>{heading}</h3>" in text
    assert text.count('data-name="') >= 9 + 1  # one heatmap per score grid + the best head's map
    assert "EoI" in text and "x1 " in text and "s1 " in text  # roles on the axes


def test_scan_style_report_with_top_heads_under_2mb(big):
    model, tok, result, out = big
    maps = head_maps(model, tok, result, k=3)
    assert len(maps) == 4 and [m["circuit"] for m in maps] == ["iteration"] * 3 + ["eoi"]
    np.testing.assert_allclose(maps[0]["pattern"], np.round(result.pattern, 3), atol=2e-3)  # rebuilt probe = the detector's
    d = {**result.to_dict(), "eoi_detected": result.eoi_detected().tolist()}
    html = page("Iteration-head atlas", section(d, maps, "s0"))
    assert len(html.encode()) < 2_000_000
    L = len(result.pattern_marks["x_pos"])
    assert len(expected_cells(maps[0])) == L and len(expected_cells(maps[3])) == L
    assert html.count('stroke="red" stroke-width="1.5"') == 4 * L  # the circuit's cells, outlined in each map


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_chromium_renders_the_report(big, tmp_path):
    from PIL import Image

    report = big[3] / "report.html"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
    ]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,900", report.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (900, 1200)
    assert (img < 250).any(axis=2).mean() > 0.02 and len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for heading in (
        "<h1>Iteration heads of",
        "<h2>",
        "<h3>Heatmaps (layer x head)</h3>",
        "<h3>Attention of the top heads</h3>",
        "<h3>Ablation</h3>",
    ):
        assert heading in dom, heading
    assert dom.count("<rect") > 12 * 12 and 'id="readout"' in dom
