"""The sequence metric, the circuit's peakiness on hand-set attention, and ``hf-iterheads eval``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import hf_iterheads
from hf_iterheads.cli import main
from hf_iterheads.errors import IterHeadsError
from hf_iterheads.evaluation import (
    evaluate_model,
    score_length,
    sequence_accuracy,
    split_by_length,
)
from hf_iterheads.tasks import get_task
from hf_iterheads.tokenizer import Layout, build_tokenizer

METRIC_DIR = Path(hf_iterheads.__file__).parent / "metrics" / "sequence_accuracy"


def test_sequence_accuracy_on_hand_made_predictions():
    refs = [[-100, -100, 4, 7, 19], [-100, 2, 19], [-100, 5, 6, 19]]
    preds = [[9, 9, 4, 7, 19], [3, 2, 19], [5, 5, 0, 19]]  # right, right (prompt ignored), one wrong token
    out = sequence_accuracy(preds, refs)
    assert out["sequence_accuracy"] == pytest.approx(2 / 3)
    assert out["token_accuracy"] == pytest.approx(7 / 8)
    with pytest.raises(IterHeadsError):
        sequence_accuracy([[1, 2]], [[1, 2, 3]])


def test_evaluate_module_loads_offline_and_wraps_the_function(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(str(METRIC_DIR))
    refs = [[-100, 4, 19], [-100, 2, 19]]
    preds = [[0, 4, 19], [0, 2, 18]]
    assert metric.compute(predictions=preds, references=refs) == sequence_accuracy(preds, refs)


class HandSetModel(torch.nn.Module):
    """Predicts the true next token everywhere and returns given attention tensors: a model whose scores we know."""

    def __init__(self, true_ids: torch.Tensor, attentions: list[torch.Tensor], vocab: int) -> None:
        super().__init__()
        self.true_ids, self.attentions, self.vocab = true_ids, attentions, vocab
        self.config = SimpleNamespace(n_layer=len(attentions), vocab_size=vocab, n_positions=64)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, output_attentions=False):
        T = input_ids.shape[1]
        nxt = torch.cat([self.true_ids[:, 1:], self.true_ids[:, -1:]], 1)[:, :T]
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        return SimpleNamespace(logits=logits, attentions=tuple(a[..., :T, :T] for a in self.attentions) if output_attentions else None)


def test_peakiness_of_a_hand_set_attention_tensor():
    tok = build_tokenizer()
    task = get_task("parity")
    layout = Layout(tok, task)
    L = 3
    x = np.array([[1, 0, 1], [0, 0, 1]])
    ids = torch.from_numpy(layout.ids(x, task.run(x)))
    T, e = ids.shape[1], Layout.eoi_index(L)
    layer1 = torch.full((2, 1, T, T), 0.01)
    layer2 = torch.full((2, 2, T, T), 0.01)  # two heads: the best one counts
    for t in range(1, L + 1):
        layer1[:, 0, e + t, e] = 0.9  # attn0: s_t -> EoI, peaked everywhere
        layer2[0, 1, e + t - 1, t] = 0.8 if t < 3 else 0.3  # attn1, head 1: 2 of 3 peaked in sequence 0 ...
        layer2[1, 1, e + t - 1, t] = 0.6  # ... and all 3 in sequence 1
        layer2[:, 0, e + t - 1, t] = 0.2  # head 0 never peaked
    model = HandSetModel(ids, [layer1, layer2], len(tok))
    out = score_length(model, layout, x, task.run(x))
    assert out["accuracy"] == 1.0 and out["generation_accuracy"] == 1.0
    assert out["attn0_peakiness"] == pytest.approx(1.0) and out["attn0_mass"] == pytest.approx(0.9)
    assert out["attn1_peakiness"] == pytest.approx(5 / 6)
    assert out["attn1_mass"] == pytest.approx((0.8 + 0.8 + 0.3 + 3 * 0.6) / 6)


def test_split_by_length_matches_the_rows():
    from hf_iterheads.data import build_dataset

    test = build_dataset("polynomial", n_len=4, per_length=16, seed=0)["test"]
    by_len = split_by_length(test)
    assert sorted(by_len) == [1, 2, 3, 4]
    rows = [r for r in test if r["length"] == 3]
    assert by_len[3][0].tolist() == [r["inputs"] for r in rows] and by_len[3][1].tolist() == [r["states"] for r in rows]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--task", "parity", "--output-dir", str(out), "--preset", "tiny", "--n-len", "5",
                 "--per-length", "16", "--batch-size", "16", "--max-steps", "4", "--eval-every", "4",
                 "--eval-per-length", "4", "--report-to", "none", "--threads", "1"]) == 0
    return out


def test_eval_cli_writes_the_json_report(checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(checkpoint), "--task", "parity,binary_copy", "--per-length", "8", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"model", "n_len", "results"} <= set(report) and len(report["results"]) == 2
    result = report["results"][0]
    assert result["task"] == "parity" and result["lengths"] == [1, 2, 3, 4, 5] and result["summary_lengths"] == [4, 5]
    keys = {"accuracy", "generation_accuracy", "attn0_peakiness", "attn0_mass", "attn1_peakiness", "attn1_mass"}
    assert set(result["summary"]) == keys and set(result["per_length"]["5"]) == keys | {"n"}
    assert all(0 <= v <= 1 for v in result["summary"].values())
    per_len = [result["per_length"][str(L)]["accuracy"] for L in (4, 5)]
    assert result["summary"]["accuracy"] == pytest.approx(np.mean(per_len))


def test_evaluate_model_on_a_no_cot_layout_has_no_attention_scores(checkpoint):
    from hf_iterheads.modeling import load_checkpoint

    model, tok = load_checkpoint(checkpoint)
    task = get_task("parity")
    x = task.sample_inputs(4, 3, np.random.default_rng(0))
    result = evaluate_model(model, tok, task, {3: (x, task.run(x))}, cot=False)
    assert result["summary"]["attn1_peakiness"] is None and 0 <= result["summary"]["accuracy"] <= 1


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-iterheads eval: error:"), err
    return err[0]


def test_bad_eval_input(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval.json"
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(checkpoint), "--task", "polynomal"], "unknown task"),
        ([str(tmp_path / "empty"), "--task", "parity"], "not a model checkpoint"),
        ([str(tmp_path), "--task", "parity"], "inside the evaluated model"),  # the output would go into the model's folder
        ([str(checkpoint), "--task", "parity", "--lengths", "1-9"], "does not fit"),
        ([str(checkpoint), "--task", "parity", "--lengths", "x"], "cannot read lengths"),
    ]
    for args, message in cases:
        assert main(["eval", *args, "-o", str(out)]) == 2
        assert message in _one_line_error(capsys)
        assert not out.exists()


def test_eval_refuses_a_task_the_vocabulary_lacks(tmp_path, capsys):
    from hf_iterheads.modeling import build_config, build_model
    from hf_iterheads.tokenizer import save_tokenizer

    tok = build_tokenizer(tasks=["parity"], model_max_length=13)
    build_model(build_config(tok, 5, "tiny")).save_pretrained(tmp_path / "ckpt")
    save_tokenizer(tok, tmp_path / "ckpt")
    assert main(["eval", str(tmp_path / "ckpt"), "--task", "polynomial", "-o", str(tmp_path / "e.json")]) == 2
    assert "<polynomial>" in _one_line_error(capsys)
    assert not (tmp_path / "e.json").exists()
