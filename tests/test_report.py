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


# --- readable reports: text labels, colour bars, heads tables, verdicts, scan order ---------------------------

GPT2_TOK = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "gpt2"


@pytest.fixture(scope="module")
def text_report(tmp_path_factory):
    """A random 2-layer x 1-head GPT-2 with the real GPT-2 tokenizer, probed as text, ablated and patched."""
    if not GPT2_TOK.is_dir():
        pytest.skip("no ../shared/tokenizers/gpt2 (not in a user's clone)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2_TOK)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_layer=2, n_head=1, n_embd=16, n_positions=128)).eval()
    result = detect_iteration_heads(model, tok, task="parity", lengths="4-6", n=6, ablate=True, patch=True)
    out = tmp_path_factory.mktemp("text-report") / "detect"
    write_outputs(result, out)
    return out / "report.html"


def test_text_report_labels_values_not_bpe_pieces_and_has_no_heatmaps_for_one_head_per_layer(text_report):
    text = text_report.read_text()
    labels = re.findall(r"<text [^>]*>([^<]*)</text>", text)
    assert labels and not any("Ġ" in t or "Ċ" in t for t in labels), [t for t in labels if "Ġ" in t][:5]
    assert any(re.fullmatch(r"x\d+ = [01]", t) for t in labels) and "EoI &quot;-&gt;&quot;" in text
    assert "<h3>Heatmaps" not in text and "<h3>Heads (2 layers x 1 head, 0-based)</h3>" in text
    assert "clean accuracy on the probes:" in text and "circuit:" in text
    assert "does not separate s_t from s&#x27;_t" in text or "does not separate s_t from s'_t" in text  # honest patching


def test_heatmaps_carry_colour_bars(big):
    text = (big[3] / "report.html").read_text()
    heatmaps = text.count("<figcaption>iteration_score</figcaption>")
    assert heatmaps == 1 and text.count("<linearGradient") >= 8  # one bar per heatmap shown
    assert "more score grids</summary>" in text  # the rest folded away


def test_scan_report_orders_models_by_name_and_groups_local_folders(big):
    from hf_iterheads.detect.atlas import report_html

    model, tok, result, out = big
    d = {**result.to_dict(), "eoi_detected": result.eoi_detected().tolist()}
    parts = [{"model": m, "revision": None, "step": None, "task": "parity", "status": "ok", "result": d, "maps": [], "n_params": 1}
             for m in ("zeta-org/b", "/tmp/some/local-model", "Alpha-org/a", "polynomial-cot")]
    html = report_html(parts)
    table = html.split("<h2>Models</h2>", 1)[1].split("<section", 1)[0]
    order = [m for m in re.findall(r'<a href="#s\d+">([^<]+)</a>', table)]
    assert order == ["Alpha-org/a", "polynomial-cot", "zeta-org/b", "/tmp/some/local-model"], order
    assert table.index("Hub and bundled models") < table.index("Local folders") < table.index("/tmp/some/local-model")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_chromium_1400px_text_report_has_none_of_the_defects(text_report, tmp_path):
    from PIL import Image

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]
    shot = tmp_path / "text.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1400,2000", text_report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1400) and (img < 250).any(axis=2).mean() > 0.01
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", text_report.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert "Ġ" not in dom and "clean accuracy on the probes" in dom and "circuit:" in dom and "<h3>Heatmaps" not in dom
    assert "EoI \"-&gt;\"" in dom or 'EoI "->"' in dom or "EoI &quot;-&gt;&quot;" in dom
