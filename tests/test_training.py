"""Tiny end-to-end training runs through the CLI: files, reload, resume, recipes, data regimes, bad input."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_iterheads.cli import main
from hf_iterheads.errors import IterHeadsError
from hf_iterheads.tasks import get_task
from hf_iterheads.tokenizer import Layout, build_tokenizer
from hf_iterheads.training import FAST, PAPER, Callback, TrainConfig, resolve_config, train_with_restarts
from hf_iterheads.training.callbacks import TRAINED_KEYS, head_formed
from hf_iterheads.training.config import length_recipe, parse_curriculum
from hf_iterheads.training.data import AdaptiveLengths, FixedSampler, OnlineData, TaskSchedule, _row_codes

TINY = ["--preset", "tiny", "--n-len", "5", "--per-length", "24", "--batch-size", "16", "--warmup-steps", "2",
        "--eval-per-length", "8", "--log-every", "2", "--report-to", "none", "--threads", "1"]


def run_train(out: Path, *extra: str, task: str = "polynomial") -> int:
    return main(["train", "--task", task, "--output-dir", str(out), *TINY, *extra])


class InterruptAt(Callback):
    """Kills the run (as Ctrl-C would) right after optimizer step ``step``: between checkpoints."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, run) -> None:
        if run.step == self.step:
            raise KeyboardInterrupt


def interrupted_train(out: Path, stop: int, *extra: str, task: str = "polynomial") -> None:
    from hf_iterheads.cli import build_parser

    args = build_parser().parse_args(["train", "--task", task, "--output-dir", str(out), *TINY, *extra])
    with pytest.raises(KeyboardInterrupt):
        train_with_restarts(resolve_config(args), callbacks=[InterruptAt(stop)])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "poly"
    assert run_train(out, "--max-steps", "8", "--eval-every", "4", "--checkpoint-every", "4") == 0
    return out


def test_end_to_end_run_writes_a_loadable_checkpoint(run):
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "metrics.jsonl", "run_config.json",
            "eval_results.json", "checkpoints"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temp dir left behind
    model = AutoModelForCausalLM.from_pretrained(run)
    tok = AutoTokenizer.from_pretrained(run)
    layout = Layout(tok, "polynomial")
    x = get_task("polynomial").sample_inputs(2, 5, np.random.default_rng(0))
    ids = torch.from_numpy(layout.ids(x, get_task("polynomial").run(x)))
    assert model(input_ids=ids).logits.shape == (2, 13, model.config.vocab_size)
    assert model.config.iterheads["tasks"] == ["polynomial"] and model.config.n_embd == 32
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "README.md")
    measured = json.loads((run / "eval_results.json").read_text())["results"][0]["summary"]
    in_card = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert in_card["accuracy"] == round(measured["accuracy"], 4)  # model-index holds the measured numbers
    assert in_card["attn1_peakiness"] == round(measured["attn1_peakiness"], 4)
    assert card.data.library_name == "transformers" and "polynomial" in card.text
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8]  # start, every 4 steps; the final full evaluation replaces step 8
    assert {"accuracy", "attn0_peakiness", "attn0_mass", "attn1_peakiness", "attn1_mass", "per_length"} <= set(evals[0])
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4", "step_8"]


@pytest.mark.parametrize("data", ["online", "fixed", "adaptive", "offsets"])
def test_resume_after_interruption_gives_the_same_weights(tmp_path, data):
    # An epoch is 8 (online) or 9 (fixed) batches: the run is killed at step 12, resumes from the step-10
    # checkpoint in the middle of its second epoch, and must end exactly where the straight run ends.
    common = ["--data", data, "--max-steps", "14", "--eval-every", "5", "--checkpoint-every", "5"]
    if data == "adaptive":  # length weights that follow the training accuracy, republished every 2 steps
        # (--log-every; without CoT there is no head to wait for): binary copy at a high constant rate, so that
        # by step 20 some lengths are learned; the share not given to the errors follows --length-weights linear
        common = ["--data", "online", "--length-sampling", "adaptive", "--max-steps", "30", "--eval-every", "10",
                  "--checkpoint-every", "10", "--lr", "1e-2", "--schedule", "constant", "--n-len", "3", "--no-cot",
                  "--length-weights", "linear"]
    if data == "offsets":  # every row shifted by a random position offset (lengths 1..3 in a 13-position context),
        # and a helper on longer lengths that joins at step 8, between the checkpoint and the kill
        common = ["--data", "online", "--position-offsets", "--max-train-len", "3", "--max-steps", "14", "--eval-every", "5",
                  "--checkpoint-every", "5", "--curriculum", "cumsum:0.3:0:5:8"]
    task, stop = ("binary_copy", "27") if data == "adaptive" else ("polynomial", "12")
    assert run_train(tmp_path / "straight", *common, task=task) == 0
    interrupted_train(tmp_path / "broken", int(stop), *common, task=task)
    assert not (tmp_path / "broken" / "config.json").exists()
    assert main(["train", "--resume", "--output-dir", str(tmp_path / "broken"), "--threads", "1"]) == 0
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "broken" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicate records after resuming
    card = (tmp_path / "straight" / "README.md").read_text()
    # on by default for every task with online data; the fixed dataset has none
    assert ("position offsets (every training row" in card) == (data != "fixed")


@pytest.mark.parametrize("gate", [0.0, 1.01])
def test_adaptive_lengths_start_when_the_head_is_forming(tmp_path, monkeypatch, gate):
    # With CoT and two layers the lengths stay uniform until attn1 peakiness reaches START_PEAKINESS at an
    # evaluation; a gate of 0 opens at the first one (step 4), a gate above 1 never does.
    monkeypatch.setattr(AdaptiveLengths, "START_PEAKINESS", gate)
    assert run_train(tmp_path / "r", "--max-steps", "8", "--eval-every", "4", "--checkpoint-every", "4") == 0
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "adapting"] == ([4] if gate == 0.0 else [])
    saved = [torch.load(f, weights_only=False) for f in (tmp_path / "r" / "checkpoints" / "step_8").glob("custom_*")]
    state = next(s for s in saved if isinstance(s, dict) and "wait" in s)  # AdaptiveLengths.state_dict()
    assert state["wait"] is (gate > 0) and bool(state["steps"]) is (gate == 0.0)


def test_frozen_positions_are_never_trained(tmp_path):
    from hf_iterheads.modeling import build_config, build_model

    assert run_train(tmp_path / "r", "--max-steps", "3", "--freeze-positions", "--seed", "5", "--lr", "1e-2") == 0
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    from hf_iterheads.tasks import BUILTIN_TASKS

    vocab = [t.name for t in BUILTIN_TASKS]  # training's vocabulary: the built-ins and the run's own tasks
    config = build_config(build_tokenizer(vocab, model_max_length=13), 5, "tiny", freeze_positions=True,
                          initializer_range=FAST.init_range, embed_init_std=FAST.embed_init_std)
    fresh = build_model(config, seed=5)
    assert torch.equal(trained.transformer.wpe.weight, fresh.transformer.wpe.weight)
    assert not torch.equal(trained.transformer.wte.weight, fresh.transformer.wte.weight)


def test_paper_recipe_is_exact_and_flags_override():
    from hf_iterheads.cli import build_parser

    args = build_parser().parse_args(["train", "--task", "polynomial", "--output-dir", "x", "--recipe", "paper"])
    cfg = resolve_config(args)
    assert (cfg.data, cfg.lr, cfg.batch_size, cfg.warmup_steps, cfg.schedule, cfg.epochs, cfg.max_steps) == (
        "fixed", 3e-4, 256, 0, "constant", 1000, None)
    assert PAPER.betas == (0.9, 0.999) and PAPER.recipe == "paper"
    assert cfg.bucket and not FAST.bucket  # the paper's loader: one length per batch; ours mixes them
    args = build_parser().parse_args(["train", "--task", "polynomial", "--output-dir", "x", "--recipe", "paper",
                                      "--lr", "1e-3", "--max-steps", "50"])
    cfg = resolve_config(args)
    assert (cfg.lr, cfg.max_steps, cfg.epochs, cfg.data) == (1e-3, 50, None, "fixed")


def test_bucketed_fixed_batches_hold_one_length_and_cover_every_row():
    groups = [np.arange(0, 10), np.arange(10, 35), np.arange(35, 40)]
    sampler = FixedSampler(groups, batch_size=8, seed=0, bucket=True)
    first = list(sampler)
    assert len(first) == len(sampler) == 2 + 4 + 1
    assert sorted(i for b in first for i in b) == list(range(40))
    assert all(len({next(g for g, rows in enumerate(groups) if i in rows) for i in b}) == 1 for b in first)
    sampler.set_epoch(1)
    assert list(sampler) != first  # reshuffled every epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # ... deterministically (resume relies on it)


@pytest.mark.parametrize("bucket", [True, False])
def test_online_batches_never_contain_test_sequences(bucket):
    task = get_task("binary_copy")
    tok = build_tokenizer()
    test_rows = np.array([[0, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]])
    exclude = {("binary_copy", 3): np.unique(_row_codes(test_rows, 2))}
    cfg = TrainConfig(tasks=["binary_copy"], output_dir="x", n_len=3, batch_size=64, length_warmup=0, bucket=bucket,
                      curriculum="")
    data = OnlineData(cfg, {"binary_copy": Layout(tok, task)}, exclude, 0, epoch_len=4)
    seen, widths = set(), set()
    for b in range(30):
        batch = data.__getitems__(list(range(b * 64, (b + 1) * 64)))
        ids, lengths = batch["input_ids"], (batch["attention_mask"].sum(1) - 3) // 2
        widths.add(len(set(lengths.tolist())))
        rows = ids[lengths == 3]
        seen |= {tuple(r) for r in (rows[:, 1:4] - int(tok.convert_tokens_to_ids("0"))).tolist()}
        for row, length in zip(batch["labels"], lengths.tolist()):
            assert (row[: length + 2] == -100).all() and (row[length + 2 : 2 * length + 3] != -100).all()  # loss after EoI
    assert widths == ({1} if bucket else {3})  # one length per batch, or every length in every batch
    assert seen and not seen & {tuple(r) for r in test_rows.tolist()}


def test_curriculum_fades_the_helper_task():
    cfg = TrainConfig(tasks=["polynomial"], output_dir="x", curriculum="binary_copy:0.5:100", n_len=16, length_warmup=30)
    schedule = TaskSchedule(cfg)
    names, w = schedule.weights(0)
    assert names == ["polynomial", "binary_copy"] and np.allclose(w, [0.5, 0.5])
    assert np.allclose(schedule.weights(50)[1], [0.75, 0.25]) and np.allclose(schedule.weights(500)[1], [1, 0])
    assert schedule.max_len(0) == 1 and schedule.max_len(30) == 16
    with pytest.raises(IterHeadsError, match="TASK:SHARE"):
        parse_curriculum("binary_copy")


def test_adaptive_lengths_draw_the_failing_lengths_more_and_publish_with_a_lag():
    lengths = AdaptiveLengths(["polynomial", "binary_copy"], n_len=4, every=10)
    assert lengths.probabilities("polynomial", 5, 4) is None  # nothing published yet: uniform
    for _ in range(100):  # L = 1, 2 always right, L = 3 half the rows, L = 4 never
        lengths.observe(np.array([0] * 8), np.array([1, 1, 2, 2, 3, 3, 4, 4]), np.array([1, 1, 1, 1, 1, 0, 0, 0]))
    lengths.after_step(9)
    assert lengths.probabilities("polynomial", 100, 4) is None  # published every 10 steps only
    lengths.after_step(10)
    assert lengths.probabilities("polynomial", 11, 4) is None  # applies from step 10 + LAG
    p = lengths.probabilities("polynomial", 12, 4)
    assert np.allclose(p, [0.125, 0.125, 0.125 + 0.5 / 3, 0.125 + 1 / 3], atol=1e-3)  # half uniform, half error
    assert np.allclose(lengths.probabilities("polynomial", 12, 2), [0.5, 0.5])  # both learned: uniform
    assert np.allclose(lengths.probabilities("binary_copy", 12, 4), 0.25)  # never observed: all wrong, uniform
    restored = AdaptiveLengths(["polynomial", "binary_copy"], n_len=4, every=10, wait=True)
    restored.load_state_dict(lengths.state_dict())
    assert np.allclose(restored.probabilities("polynomial", 12, 4), p) and np.allclose(restored.ema, lengths.ema)
    assert not restored.wait
    waiting = AdaptiveLengths(["polynomial"], n_len=4, every=10, wait=True)  # until the head forms: uniform
    waiting.observe(np.array([0, 0]), np.array([1, 4]), np.array([1, 0]))
    waiting.after_step(10)
    assert waiting.probabilities("polynomial", 100, 4) is None and waiting.ema[0, 1] > 0
    # The gate: attn1 peakiness averaged over L = 4..max_len, every task; below 4 does not count.
    results = [{"per_length": {"2": {"attn1_peakiness": 0.0}, "4": {"attn1_peakiness": 0.4},
                               "5": {"attn1_peakiness": 0.7}}}]
    assert head_formed(results, 5, AdaptiveLengths.START_PEAKINESS) and not head_formed(results, 5)
    assert not head_formed(results, 4, AdaptiveLengths.START_PEAKINESS)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-iterheads train: error:"), err
    return err[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "polynomal"], "unknown task"),
        (["--task", "polynomial", "--preset", "huge"], "unknown model preset"),
        (["--task", "polynomial", "--recipe", "slow"], "unknown recipe"),
        (["--task", "polynomial", "--data", "fixed", "--curriculum", "binary_copy:0.5:10"], "need --data online"),
        (["--task", "polynomial", "--data", "fixed", "--length-sampling", "adaptive"], "need --data online"),
        (["--task", "polynomial", "--curriculum", "nope:0.5:10"], "unknown task"),
        (["--task", "polynomial", "--n-len", "0"], "at least 1"),
        (["--task", "polynomial", "--init-from", "/nonexistent/ckpt"], "not a directory"),
    ],
)
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--max-steps", "2", "--report-to", "none", *args]) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists()


def test_non_empty_output_dir_and_bad_resume(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["train", "--task", "parity", "--output-dir", str(tmp_path), "--max-steps", "2"]) == 2
    assert "not empty" in _one_line_error(capsys)
    assert main(["train", "--task", "parity", "--output-dir", str(tmp_path), "--max-steps", "2", "--overwrite"]) == 2
    assert "does not look like a training run" in _one_line_error(capsys)
    assert main(["train", "--resume", "--output-dir", str(tmp_path)]) == 2
    assert "no run_config.json" in _one_line_error(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_init_from_a_checkpoint_without_the_task_token(tmp_path, capsys):
    from hf_iterheads.modeling import build_config, build_model
    from hf_iterheads.tokenizer import save_tokenizer

    tok = build_tokenizer(tasks=["parity"], model_max_length=13)
    ckpt = tmp_path / "parity_only"
    build_model(build_config(tok, 5, "tiny")).save_pretrained(ckpt)
    save_tokenizer(tok, ckpt)
    out = tmp_path / "run"
    assert main(["train", "--task", "polynomial", "--init-from", str(ckpt), "--output-dir", str(out),
                 "--n-len", "5", "--max-steps", "2", "--report-to", "none"]) == 2
    assert "<polynomial>" in _one_line_error(capsys)
    assert not out.exists()
    assert main(["train", "--task", "parity", "--init-from", str(ckpt), "--output-dir", str(out),
                 "--n-len", "6", "--max-steps", "2", "--report-to", "none"]) == 2
    assert "does not fit" in _one_line_error(capsys)
    assert not out.exists()


def test_max_train_len_limits_training_lengths_not_evaluation():
    cfg = TrainConfig(tasks=["parity"], output_dir="x", n_len=8, max_train_len=3, curriculum="", length_warmup=0)
    assert TaskSchedule(cfg).max_len(0) == 3 and TaskSchedule(cfg).max_len(10**6) == 3


@pytest.mark.parametrize("bucket,sampling", [(True, "uniform"), (False, "uniform"), (False, "adaptive")])
def test_a_helper_trains_on_its_own_longer_lengths(bucket, sampling):
    """Length generalisation's helper: the main task stays on 1..--max-train-len, the helper goes to its MAX_LEN."""
    tok = build_tokenizer()
    cfg = TrainConfig(tasks=["parity"], output_dir="x", n_len=8, max_train_len=3, batch_size=32, length_warmup=0,
                      bucket=bucket, curriculum="binary_copy:0.5:0:8", length_sampling=sampling, length_weights="uniform")
    assert cfg.helpers[0].max_len == 8 and (cfg.longest_trained, cfg.longest_drawn) == (3, 8)
    layouts = {n: Layout(tok, n) for n in cfg.all_tasks}
    lengths = AdaptiveLengths(cfg.all_tasks, cfg.longest_drawn) if sampling == "adaptive" else None
    data = OnlineData(cfg, layouts, {}, 0, epoch_len=4, lengths=lengths)
    seen = {"parity": set(), "binary_copy": set()}
    for b in range(40):
        batch = data.__getitems__(list(range(b * 32, (b + 1) * 32)))
        task_ids, n = batch["input_ids"][:, 0].tolist(), ((batch["attention_mask"].sum(1) - 3) // 2).tolist()
        for t, L in zip(task_ids, n):
            seen[next(k for k, lay in layouts.items() if lay.task_id == t)].add(L)
    assert seen["parity"] == {1, 2, 3} and seen["binary_copy"] == set(range(1, 9))


@pytest.mark.parametrize("bucket,sampling", [(True, "uniform"), (False, "uniform"), (False, "adaptive")])
def test_linear_length_weights_draw_each_length_in_proportion_to_it(bucket, sampling):
    """--length-weights linear: P(L) = L / sum(1..max); helpers keep their own longest length."""
    tok = build_tokenizer()
    size, n_batches = (4, 3000) if bucket else (64, 60)  # about 4,000 draws of (task, L) either way
    cfg = TrainConfig(tasks=["parity"], output_dir="x", n_len=8, max_train_len=4, batch_size=size, length_warmup=0,
                      bucket=bucket, curriculum="cumsum:0.5:0:8", length_sampling=sampling, length_weights="linear")
    layouts = {n: Layout(tok, n) for n in cfg.all_tasks}
    lengths = AdaptiveLengths(cfg.all_tasks, cfg.longest_drawn, weights="linear") if sampling == "adaptive" else None
    data = OnlineData(cfg, layouts, {}, 0, epoch_len=4, lengths=lengths)
    counts = {"parity": np.zeros(9), "cumsum": np.zeros(9)}
    for b in range(n_batches):
        batch = data.__getitems__(list(range(b * size, (b + 1) * size)))
        task_ids, n = batch["input_ids"][:, 0].tolist(), ((batch["attention_mask"].sum(1) - 3) // 2).tolist()
        for t, L in zip(task_ids, n):
            counts[next(k for k, lay in layouts.items() if lay.task_id == t)][L] += 1 / (size if bucket else 1)
    for name, longest in (("parity", 4), ("cumsum", 8)):
        share = counts[name][1:] / counts[name].sum()
        want = np.r_[np.arange(1, longest + 1) / (longest * (longest + 1) / 2), np.zeros(8 - longest)]
        assert np.abs(share - want).max() < 0.04, (name, share.round(3))
    # once adaptive lengths publish, the share not given to the errors follows the prior
    adaptive = AdaptiveLengths(["parity"], n_len=4, every=10, weights="linear")
    for _ in range(100):  # L = 1..3 always right, L = 4 never
        adaptive.observe(np.zeros(4, dtype=int), np.array([1, 2, 3, 4]), np.array([1, 1, 1, 0]))
    adaptive.after_step(10)
    assert np.allclose(adaptive.probabilities("parity", 12, 4), [0.05, 0.1, 0.15, 0.2 + 0.5], atol=1e-3)


def test_length_weights_need_online_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "parity", "--data", "fixed", "--length-weights", "linear", "--output-dir", str(out),
                 "--max-steps", "2", "--report-to", "none"]) == 2
    assert "--length-weights linear" in _one_line_error(capsys) and not out.exists()
    assert run_train(out, "--length-weights", "linear", "--max-steps", "2", task="parity") == 0
    assert json.loads((out / "run_config.json").read_text())["length_weights"] == "linear"
    assert "training lengths drawn in proportion to L" in (out / "README.md").read_text()


def test_a_helpers_longest_length_is_read_and_checked(tmp_path, capsys):
    assert parse_curriculum("cumsum:0.2:0:16,binary_copy:0.5:3000") == (("cumsum", 0.2, 0, 16, 0),
                                                                         ("binary_copy", 0.5, 3000, None, 0))
    late = parse_curriculum("cumsum:0.2:100::50")[0]  # joins at step 50 on the run's lengths, fades over 100 steps
    assert (late.max_len, late.start) == (None, 50)
    assert [late.share_at(s) for s in (0, 49, 50, 100, 150, 500)] == pytest.approx([0, 0, 0.2, 0.1, 0, 0])
    assert TaskSchedule(TrainConfig(tasks=["parity"], output_dir="x", curriculum="cumsum:0.2:0:16:50")).weights(49)[1][1] == 0
    schedule = TaskSchedule(TrainConfig(tasks=["parity"], output_dir="x", n_len=16, max_train_len=12,
                                        curriculum="cumsum:0.2:0:16", length_warmup=10))
    assert schedule.max_lens(0) == [1, 1] and schedule.max_lens(5) == [6, 8] and schedule.max_lens(10) == [12, 16]
    for spec in ("cumsum:0.2:0:0", "cumsum:0.2:0:x", "cumsum:0.2:0:4:-1", "cumsum:0.2:0:4:1:2"):
        with pytest.raises(IterHeadsError, match="curriculum"):
            parse_curriculum(spec)
    out = tmp_path / "run"
    assert main(["train", "--task", "parity", "--n-len", "8", "--curriculum", "cumsum:0.2:0:9", "--output-dir",
                 str(out), "--max-steps", "2", "--report-to", "none"]) == 2
    assert "longest length 9 is over --n-len (8)" in _one_line_error(capsys) and not out.exists()
    assert main(["train", "--task", "parity", "--n-len", "8", "--max-train-len", "6", "--curriculum", "cumsum:0.2:0:8",
                 "--output-dir", str(out), "--max-steps", "2", "--report-to", "none", "--preset", "tiny"]) == 0
    card = (out / "README.md").read_text()
    assert "lengths 1..6; evaluated on 1..8, so the longer lengths are unseen" in card and "cumsum:0.2:0:8" in card
    # each evaluation also records the attention metrics over 4..6, the ones the restarts read
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert evals and all(r["trained"]["max_len"] == 6 and set(TRAINED_KEYS) <= set(r["trained"]) for r in evals)
    assert all(isinstance(r["trained"]["attn1_mass"], float) for r in evals)


def test_curriculum_and_adaptive_lengths_are_defaults_of_online_training_only():
    import argparse

    from hf_iterheads.cli import build_parser

    def cfg(*extra):
        args = build_parser().parse_args(["train", "--task", "parity", "--output-dir", "x", *extra])
        assert isinstance(args, argparse.Namespace)
        return resolve_config(args)

    assert FAST.curriculum == "auto"  # resolved per task: cumsum rows for tasks with few distinct inputs
    assert cfg().curriculum == "binary_copy:0.5:3000,cumsum:0.3:0"  # parity: 8 training inputs at L = 4
    assert cfg("--task", "cumsum").curriculum == "binary_copy:0.5:3000"
    assert cfg("--task", "s3_product", "--n-len", "2").curriculum == "binary_copy:0.5:3000,cumsum:0.3:0"  # 36 inputs
    assert cfg("--task", "cumsum", "--curriculum", "auto").curriculum == "binary_copy:0.5:3000"
    assert cfg("--init-from", "polynomial-cot").curriculum == ""
    assert cfg("--data", "fixed").curriculum == ""
    assert cfg("--init-from", "polynomial-cot", "--curriculum", "binary_copy:0.2:10").curriculum == "binary_copy:0.2:10"
    assert cfg("--curriculum", "").curriculum == ""
    # adaptive length sampling is the online default; the fixed dataset (and the paper's recipe) keep their lengths
    assert cfg().length_sampling == "adaptive" and cfg("--init-from", "polynomial-cot").length_sampling == "adaptive"
    assert cfg("--data", "fixed").length_sampling == "uniform" and cfg("--recipe", "paper").length_sampling == "uniform"
    assert cfg("--length-sampling", "uniform").length_sampling == "uniform"
    # length weights: linear for parity alone; uniform for the other tasks, mixtures, transfer, fixed data, the paper
    assert FAST.length_weights is None and PAPER.length_weights == "uniform"
    assert cfg().length_weights == "linear" and cfg("--task", "parity", "--max-train-len", "12").length_weights == "linear"
    assert {cfg("--task", t).length_weights for t in ("binary_copy", "cumsum", "s3_product")} == {"uniform"}
    assert cfg("--task", "polynomial").length_weights == "linear"  # state 0 ignores x_t: cumsum rows, long lengths
    assert cfg("--task", "polynomial").curriculum == "binary_copy:0.5:3000,cumsum:0.3:0"
    assert cfg("--task", "parity,polynomial").length_weights == "linear"  # both get the cumsum rows and read their state
    assert cfg("--task", "parity,cumsum").length_weights == "uniform"  # linear only when every task has the property
    assert cfg("--init-from", "polynomial-cot").length_weights == "uniform"
    assert cfg("--data", "fixed").length_weights == "uniform" and cfg("--recipe", "paper").length_weights == "uniform"
    assert cfg("--length-weights", "uniform").length_weights == "uniform"
    assert cfg("--task", "cumsum", "--length-weights", "linear").length_weights == "linear"
    # the length recipe is the same for the three paper tasks: helper rows on 1..n_len, linear weights, offsets
    for task in ("binary_copy", "parity", "polynomial"):
        c = cfg("--task", task, "--max-train-len", "12", *length_recipe(16))
        assert (c.length_weights, c.position_offsets, c.longest_trained) == ("linear", True, 12)
        assert [(h.task, h.max_len) for h in parse_curriculum(c.curriculum)] == [("binary_copy", None), ("cumsum", 16)]
    # position offsets: on for every task, mixtures included; off for transfer and fixed data
    assert FAST.position_offsets is None and PAPER.position_offsets is False
    assert cfg("--task", "cumsum").position_offsets is True and cfg("--task", "s3_product").position_offsets is True
    assert cfg().position_offsets is True and cfg("--task", "binary_copy").position_offsets is True
    assert cfg("--task", "polynomial").position_offsets is True
    assert cfg("--task", "cumsum,s3_product").position_offsets is True and cfg("--task", "cumsum,parity").position_offsets is True
    assert cfg("--task", "cumsum,polynomial").position_offsets is True
    assert cfg("--task", "cumsum", "--no-position-offsets").position_offsets is False
    assert cfg("--position-offsets").position_offsets is True
    assert cfg("--task", "cumsum", "--init-from", "polynomial-cot").position_offsets is False
    assert cfg("--task", "cumsum", "--data", "fixed").position_offsets is False
    assert cfg("--task", "cumsum", "--recipe", "paper").position_offsets is False
    # the plateau restart's threshold: 0.4, and 0.22 for the binary tasks (late heads); the paper's recipe never restarts
    assert FAST.restart_below is None and PAPER.restart_at == 0
    assert cfg().restart_below == 0.22 and cfg("--task", "parity", "--restart-at", "1000").restart_below == 0.4
    assert cfg("--task", "polynomial").restart_below == 0.4 and cfg("--task", "cumsum,s3_product").restart_below == 0.4
    assert cfg("--task", "polynomial,parity").restart_below == 0.22 and cfg("--task", "cumsum", "--n-len", "2").restart_below == 0.22
    assert cfg("--restart-below", "0.3").restart_below == 0.3 and cfg("--task", "polynomial").restart_at == 3000
    # binary copy is judged at step 1,000 (its head shows by then or not at all), at 0.4, with five restarts
    bc = cfg("--task", "binary_copy")
    assert (bc.restart_at, bc.restart_below, bc.max_restarts) == (1000, 0.4, 5) and FAST.restart_at is None
    assert (cfg().restart_at, cfg().max_restarts, cfg("--task", "binary_copy,parity").restart_at) == (3000, 1, 3000)
    assert [cfg("--task", t).max_restarts for t in ("polynomial", "polynomial,parity", "cumsum")] == [2, 1, 1]
    assert cfg("--task", "binary_copy", "--restart-at", "3000").restart_below == 0.22  # judged late: the late rule
    assert cfg("--task", "binary_copy", "--max-restarts", "2").max_restarts == 2 and cfg("--recipe", "paper").restart_at == 0
    # the step budget: 9,000 for cumsum and s3_product (early heads), 12,000 otherwise; --epochs or --max-steps replace it
    assert FAST.max_steps is None and PAPER.max_steps is None and PAPER.epochs == 1000
    assert (cfg().max_steps, cfg("--task", "binary_copy").max_steps, cfg("--task", "polynomial").max_steps) == (12000, 12000, 12000)
    assert cfg("--task", "cumsum,s3_product").max_steps == 9000 and cfg("--task", "cumsum", "--n-len", "2").max_steps == 12000
    assert cfg("--task", "cumsum,polynomial").max_steps == 12000
    assert cfg("--max-steps", "500").max_steps == 500 and (cfg("--epochs", "3").max_steps, cfg("--epochs", "3").epochs) == (None, 3)
    assert (cfg("--recipe", "paper").max_steps, cfg("--recipe", "paper").epochs) == (None, 1000)
    assert (cfg("--recipe", "paper", "--max-steps", "50").max_steps, cfg("--recipe", "paper", "--max-steps", "50").epochs) == (50, None)


def test_bad_max_train_len_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "parity", "--output-dir", str(out), "--n-len", "5", "--max-train-len", "9"]) == 2
    assert "--max-train-len" in _one_line_error(capsys)
    assert not out.exists()


def test_formed_cosine_waits_for_the_head_then_decays_and_survives_a_checkpoint():
    from hf_iterheads.training.schedule import FormedThenCosine

    lam = FormedThenCosine(warmup_steps=10, decay_steps=100)
    assert lam(5) == 0.5 and lam(10) == 1.0 and lam(5000) == 1.0  # constant while the head has not formed
    lam.decay_start = 510  # the head formed: down to 0 over 100 steps
    assert lam(510) == 1.0 and abs(lam(560) - 0.5) < 1e-9 and lam(610) == 0.0 and lam(900) == 0.0
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    saved = torch.optim.lr_scheduler.LambdaLR(opt, lam).state_dict()
    fresh = FormedThenCosine(10, 100)
    torch.optim.lr_scheduler.LambdaLR(opt, fresh).load_state_dict(saved)
    assert fresh.decay_start == 510  # --resume continues the decay where it was
    per = {str(L): {"attn1_peakiness": 0.95 if L <= 12 else 0.1} for L in range(1, 17)}
    assert head_formed([{"per_length": per}], max_len=12) and not head_formed([{"per_length": per}], max_len=16)
    assert not head_formed([{"per_length": {str(L): {"attn1_peakiness": None} for L in range(1, 17)}}], 16)


def test_restart_at_a_plateau_starts_a_fresh_attempt_and_resumes_into_it(tmp_path):
    # A threshold no attention mass reaches: the first evaluation from --restart-at on (step 4 for --restart-at 3)
    # is a plateau. Attempt 0 stops there, its records move to attempts/0/, and attempt 1 (another seed) trains
    # for the 12 - 4 steps the run has left; a kill inside attempt 1 resumes into attempt 1 and ends with the same
    # weights.
    common = ["--max-steps", "12", "--eval-every", "4", "--checkpoint-every", "4", "--restart-at", "3",
              "--restart-below", "1", "--max-restarts", "1"]
    assert run_train(tmp_path / "r", *common) == 0
    run = tmp_path / "r"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    failed = [json.loads(line) for line in (run / "attempts" / "0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in failed if r["kind"] == "plateau"] == [4] and not (run / "attempts" / "1").exists()
    assert not [r for r in records if r["kind"] == "plateau"]  # attempt 1 is the last one allowed: no restart
    assert json.loads((run / "run_config.json").read_text())["attempt"] == 1
    assert json.loads((run / "eval_results.json").read_text())["step"] == 8  # 4 + 8 = the run's 12 steps
    assert "(attempt 2: the earlier attempts stopped at step 4, where layer 1 had not anchored" in (run / "README.md").read_text()
    interrupted_train(tmp_path / "k", 6, *common)  # killed in attempt 1, between checkpoints
    assert main(["train", "--resume", "--output-dir", str(tmp_path / "k")]) == 0
    a, b = load_file(run / "model.safetensors"), load_file(tmp_path / "k" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert TrainConfig(seed=3).run_seed == 3 and TrainConfig(seed=3, attempt=1).run_seed != 3


def test_the_plateau_signal_reads_the_layer2_mass_and_only_where_there_is_one():
    from hf_iterheads.training.callbacks import HeadWatch, _plateau, trained_mean

    def results(*masses, unseen=None):  # one result per mass: that mass at L = 1..12, ``unseen`` at 13..16
        return [{"summary": {"attn1_mass": m}, "per_length": {L: {"n": 8, "attn1_mass": m if L <= 12 else unseen}
                                                               for L in range(1, 17)}} for m in masses]

    assert _plateau(results(0.9, 0.3), 0.5, 16) and not _plateau(results(0.9, 0.6), 0.5, 16)
    assert not _plateau(results(None), 0.5, 16) and not _plateau(None, 0.5, 16)  # no second layer or CoT: no restart
    # trained on 1..12: the untrained lengths' low mass must not make a forming head look like a plateau
    assert _plateau(results(0.45, unseen=0.05), 0.4, 16) and not _plateau(results(0.45, unseen=0.05), 0.4, 12)
    r = results(0.45, unseen=0.05)[0]
    r["summary"]["attn1_mass"] = float(np.mean([r["per_length"][L]["attn1_mass"] for L in range(4, 17)]))
    assert trained_mean(r, "attn1_mass", 16) == r["summary"]["attn1_mass"]  # the whole range: the summary, exactly
    assert TrainConfig(tasks=["parity"]).restart_at == 3000 and PAPER.restart_at == 0  # the paper's never restarts
    watch = HeadWatch.__new__(HeadWatch)
    watch.cfg = TrainConfig(restart_at=2500, eval_every=300)
    assert [s for s in range(0, 6001, 300) if watch.restart_due(s)] == [2700]  # the first evaluation from 2,500 on
    watch.cfg = TrainConfig(restart_at=0)
    assert not any(watch.restart_due(s) for s in range(0, 6001, 500))


def test_restarts_share_the_runs_step_budget():
    # --max-steps is the whole run's: an attempt restarted at step 3,000 leaves the next one 6,000 of the 9,000.
    cfg = TrainConfig(restart_at=3000, eval_every=500, max_steps=9000, max_restarts=1)
    assert FAST.max_steps is None and cfg.restart_step == 3000 and TrainConfig(restart_at=2700, eval_every=500).restart_step == 3000
    assert cfg.attempt_steps(9000) == 9000 and replace(cfg, attempt=1, restarted_at=(3000,)).attempt_steps(9000) == 6000
    # a restart must leave the next attempt at least the steps this one had when judged; --max-restarts at most
    assert not replace(cfg, attempt=1, restarted_at=(3000,)).may_restart(9000, 1000)  # --max-restarts 1 (default)
    cfg = replace(cfg, max_restarts=3)
    assert cfg.may_restart(9000, 3000) and cfg.may_restart(6000, 3000) and not cfg.may_restart(5500, 3000)
    assert replace(cfg, attempt=1, restarted_at=(1000,)).may_restart(9000, 3000)  # 5,000 left
    assert replace(cfg, attempt=2, restarted_at=(3000, 3000)).may_restart(9000, 1000)
    assert not replace(cfg, attempt=2, restarted_at=(3000, 3000)).may_restart(9000, 2000)  # 1,000 left < 2,000
    assert not replace(cfg, attempt=3, restarted_at=(1000,) * 3).may_restart(9000, 1000)  # --max-restarts 3
    assert not replace(cfg, max_restarts=0).may_restart(9000, 1000)
    # a run saved before restarted_at was stored: each earlier attempt stopped at its --restart-at evaluation
    old = {k: v for k, v in dataclasses.asdict(replace(cfg, attempt=1, tasks=["polynomial"])).items()
           if k not in ("restarted_at", "anchor_at")}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "run_config.json").write_text(json.dumps(old))
        loaded = TrainConfig.load(Path(d) / "run_config.json")
    assert loaded.restarted_at == (3000,) and loaded.attempt_steps(9000) == 6000 and loaded.anchor_at == 0
    # a parity run saved before --length-weights existed drew its lengths uniformly (not today's auto: linear)
    old = {k: v for k, v in dataclasses.asdict(TrainConfig(tasks=["parity"], output_dir="x")).items()
           if k != "length_weights"}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "run_config.json").write_text(json.dumps(old))
        assert TrainConfig.load(Path(d) / "run_config.json").length_weights == "uniform"


def test_a_resumed_run_remembers_the_anchor_it_judged(tmp_path):
    # check() remembers attn0 peakiness over the trained lengths; a resumed run rebuilds it from the eval records,
    # so it must read the same numbers (the "trained" means where a run trains on fewer lengths than it evaluates)
    from types import SimpleNamespace

    from hf_iterheads.training.callbacks import HeadWatch

    records = [{"kind": "eval", "step": 4, "task": "parity", "attn0_peakiness": 0.1,
                "trained": {"max_len": 6, "attn0_peakiness": 0.3}},
               {"kind": "eval", "step": 4, "task": "cumsum", "attn0_peakiness": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    watch = HeadWatch(TrainConfig(tasks=["parity"], output_dir="x", n_len=8, max_train_len=6), None, None, None)
    watch.on_start(SimpleNamespace(step=8, out=tmp_path, main=True, stop=False))
    assert watch.anchor == {"parity": 0.3, "cumsum": 0.25}


def test_the_anchor_check_reads_layer1_on_eoi_with_offsets_only():
    from hf_iterheads.training.callbacks import _unanchored

    assert _unanchored({"binary_copy": 0.15}, 0.2) and not _unanchored({"binary_copy": 0.29}, 0.2)
    assert not _unanchored({}, 0.2)  # no attn0 (no CoT, one layer): never a restart
    assert TrainConfig(tasks=["binary_copy"]).anchor_below == 0.2 and TrainConfig(tasks=["cumsum"]).anchor_below == 0.2
    assert TrainConfig(tasks=["polynomial"], position_offsets=False).anchor_below == 0.0  # no offsets: EoI found later
    assert TrainConfig(tasks=["polynomial"]).anchor_below == 0.2
    assert FAST.anchor_at == 0 and PAPER.anchor_at == 0 and TrainConfig(tasks=["cumsum"]).max_restarts == 1  # opt-in


def test_an_unanchored_attempt_restarts_early_and_the_card_says_where(tmp_path):
    # A threshold no peakiness reaches: the first evaluation from --anchor-at on (step 4) restarts; attempt 1
    # gets the 8 steps left and, with --max-restarts 1, trains them.
    common = ["--max-steps", "12", "--eval-every", "4", "--anchor-at", "3", "--anchor-below", "1", "--restart-at", "0",
              "--position-offsets", "--max-restarts", "1"]
    assert run_train(tmp_path / "r", *common) == 0
    run = tmp_path / "r"
    failed = [json.loads(line) for line in (run / "attempts" / "0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in failed if r["kind"] == "unanchored"] == [4] and not (run / "attempts" / "1").exists()
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["attempt"] == 1 and saved["restarted_at"] == [4] and saved["anchor_below"] == 1
    assert json.loads((run / "eval_results.json").read_text())["step"] == 8
    assert "the earlier attempts stopped at step 4, where layer 1 had not anchored on EoI" in (run / "README.md").read_text()
    assert main(["train", "--output-dir", str(tmp_path / "bad"), "--task", "binary_copy", "--anchor-below", "2"]) == 2
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("offsets", [False, True])
def test_the_length_split_step_gives_the_whole_batch_gradient(offsets):
    # Mixed-length batches run as two length groups (less padding); the summed, token-weighted losses must give
    # the stock forward's loss and gradients on the whole batch (eval mode: dropout is the only random part).
    from accelerate import Accelerator

    from hf_iterheads.modeling import build_config, build_model
    from hf_iterheads.training.data import assemble, position_offsets
    from hf_iterheads.training.loop import length_groups, step_function

    tok = build_tokenizer()
    model = build_model(build_config(tok, n_len=8, preset="paper", cot=True, n_embd=32), seed=1).eval()
    task, rng, layout = get_task("polynomial"), np.random.default_rng(0), Layout(tok, "polynomial", True)
    parts = [(layout, x, task.run(x)) for x in (task.sample_inputs(n, L, rng) for L, n in ((1, 3), (8, 2), (2, 4), (7, 1)))]
    batch = assemble(parts, layout.pad_id)
    if offsets:
        batch["position_ids"] = position_offsets(batch["attention_mask"], model.config.n_positions, rng)
    groups = length_groups(batch)
    assert len(groups) == 2 and sorted(torch.cat(groups).tolist()) == list(range(10))
    assert len(length_groups({k: v[:3] for k, v in batch.items()})) == 1  # one length (bucketed): one group
    stock = model(**batch)
    expected = torch.autograd.grad(stock.loss, list(model.parameters()))
    loss, correct, reordered = step_function(Accelerator(cpu=True), model, TrainConfig(tasks=["polynomial"]))(batch)
    assert torch.allclose(loss, stock.loss, atol=1e-6) and correct.shape == (10,)
    order = torch.cat(groups)
    assert torch.equal(reordered["input_ids"], batch["input_ids"][order])  # callbacks see rows matching `correct`
    for p, g in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, g, atol=1e-6)
