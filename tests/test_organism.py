"""The text organism: the positive control of the text path. A small GPT-2 with the real GPT-2 tokenizer, trained on
the detector's own text probes, must keep being found by ``detect`` through text: under two templates and after
two worked examples, its head scores >= 0.9, ablating it removes >= half of the accuracy above chance, and patching
it moves >= half of the logit difference. Under templates it never saw, the drop is reported. The bundled model is
loaded, never trained, here."""

from __future__ import annotations

import json

import pytest

from hf_iterheads.detect.control import ORGANISM, measure_organism, organism_meta, organism_path
from hf_iterheads.detect.probes import DEFAULT_TEMPLATE

OTHER_TEMPLATE = "{inputs} = {states}"
TWO_LINES = "Input: {inputs}\nOutput: {states}"
RENDERINGS = (("default", DEFAULT_TEMPLATE, 0), ("other template", OTHER_TEMPLATE, 0), ("few-shot", DEFAULT_TEMPLATE, 2),
              ("held out", "{inputs} => {states} ;", 0), ("two lines", TWO_LINES, 0))


@pytest.fixture(scope="module")
def measured():
    path = organism_path()
    assert path is not None, f"the bundled {ORGANISM} checkpoint is missing"
    return measure_organism(path, lengths="4-12", n=12, renderings=RENDERINGS)


def test_loads_with_from_pretrained_and_its_gpt2_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = organism_path()
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert len(tok) == model.config.vocab_size == 50257 and tok.convert_ids_to_tokens(tok(" 10")["input_ids"]) == ["Ġ10"]
    meta = organism_meta(path)
    assert meta["task"] == "polynomial" and {DEFAULT_TEMPLATE, OTHER_TEMPLATE} <= set(meta["templates"])
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 20_000_000 and (path / "tokenizer.json").is_file() and "MIT" in (path / "SOURCE.txt").read_text()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))  # safetensors only


def _found(measured, name):
    r = next(x for x in measured["renderings"] if x["rendering"] == name)
    assert r["trained"] and r["detected"] and r["score"] >= 0.9, r
    assert r["removed"] is not None and r["removed"] >= 0.5, r
    assert r["separates"] and r["patch_share"] is not None and r["patch_share"] >= 0.5, r
    assert r["found"], r


@pytest.mark.parametrize("name", ["default", "other template", "few-shot"])
def test_the_text_path_finds_the_organisms_head(measured, name):
    _found(measured, name)


@pytest.mark.parametrize("name", ["held out", "two lines"])
def test_a_template_never_trained_on_reports_its_drop(measured, name):
    r = next(x for x in measured["renderings"] if x["rendering"] == name)
    assert not r["trained"] and r["drop"] is not None
    default = next(x for x in measured["renderings"] if x["rendering"] == "default")
    assert r["drop"] == pytest.approx(default["score"] - r["score"], abs=1e-5)
    assert r["drop"] > 0.3 and not r["found"]
    json.dumps(measured)  # the card's numbers are plain JSON


def test_detect_report_says_how_much_an_untrained_template_costs(tmp_path):
    from hf_iterheads.detect.detection import detect_iteration_heads, write_outputs

    result = detect_iteration_heads(str(organism_path()), task="polynomial", lengths="4-6", n=6, template="{inputs} => {states} ;")
    write_outputs(result, tmp_path / "det")
    html = (tmp_path / "det" / "report.html").read_text()
    assert "drop from its trained default" in html and "not trained on" in html and "text_eval.json" in html
