"""``hf-iterheads scan`` offline, in fresh processes: bundled checkpoints, two random zoo models, a model laid into
a Hub cache under two revisions (named by repo id, HF_HUB_OFFLINE=1) and a non-causal model that must fail as a row.

Checks: the Parquet schema, the failure row, resume (finished triples untouched, new ones added), refusing other
settings, the figures, report.html, ``load_dataset`` on the --push-to-hub --dry-run folder, and 2 CPU processes
under ``accelerate launch``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import lay_into_hub_cache
from tests.test_detection import CLI_SCRIPT, tiny_model

BUNDLED = ["polynomial-cot", "parity-cot", "polynomial-nocot"]
COMMITS = {"main": "a" * 40, "step100": "b" * 40}
COMMON = ["--tasks", "parity,polynomial", "--n", "6", "--lengths", "4-5", "--batch-size", "8", "--maps", "2"]


def _env(hf_home: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("HF_HUB_CACHE", None)
    return env


def _cli(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hf_iterheads.cli", "scan", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Folders: two zoo models, a non-causal one, and a Hub cache holding tiny-org/tiny-iter at main and step100."""
    from transformers import DistilBertConfig

    from hf_iterheads.tokenizer import build_tokenizer

    tmp = tmp_path_factory.mktemp("scan")
    tok = build_tokenizer()
    folders = {}
    for name, arch, seed in (
        ("zoo-gpt2", "gpt2", 0),
        ("zoo-llama", "llama_gqa", 1),
        ("rev-main", "gpt2", 2),
        ("rev-step", "gpt2", 3),
    ):
        folders[name] = tmp / name
        tiny_model(arch, seed=seed).save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    hub = tmp / "hf_home" / "hub"
    lay_into_hub_cache(folders["rev-main"], "tiny-org/tiny-iter", hub, revision="main", commit=COMMITS["main"])
    lay_into_hub_cache(folders["rev-step"], "tiny-org/tiny-iter", hub, revision="step100", commit=COMMITS["step100"])
    folders["bert"] = tmp / "bert"
    DistilBertConfig(vocab_size=64, dim=32, hidden_dim=64, n_layers=1, n_heads=2).save_pretrained(folders["bert"])
    tok.save_pretrained(folders["bert"])
    return tmp, folders, _env(tmp / "hf_home")


@pytest.fixture(scope="module")
def atlas(zoo):
    """Run 1 without zoo-llama; run 2 with every model (resume) and the dry-run push."""
    tmp, f, env = zoo
    out = tmp / "atlas"
    first = [*BUNDLED, str(f["zoo-gpt2"]), "tiny-org/tiny-iter@main,step100", str(f["bert"])]
    run1 = _cli([*first, *COMMON, "--ablate", "--output-dir", str(out)], env)
    assert run1.returncode == 0, run1.stderr[-3000:]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    run2 = _cli(
        [
            *first,
            str(f["zoo-llama"]),
            *COMMON,
            "--ablate",
            "--output-dir",
            str(out),
            "--push-to-hub",
            "acme/iter-atlas",
            "--dry-run",
        ],
        env,
    )
    assert run2.returncode == 0, run2.stderr[-3000:]
    return out, run1, run2, mtimes


def test_parquet_schema_rows_and_failure(atlas):
    from datasets import Dataset

    out, run1, _, _ = atlas
    assert "scanned 14 of 14" in run1.stdout and "2 failed" in run1.stdout
    ds = Dataset.from_parquet(str(out / "results.parquet"))
    f = ds.features
    for col, kind in {
        "model": "string",
        "revision": "string",
        "task": "string",
        "layer": "int64",
        "head": "int64",
        "iteration_score": "float64",
        "baseline": "float64",
        "prev_score": "float64",
        "next_score": "float64",
        "eoi_score": "float64",
        "peakiness": "float64",
        "detected": "bool",
        "clean_token_accuracy": "float64",
        "chance_token_accuracy": "float64",
        "ablated": "bool",
        "ablation_zero_top_token_accuracy": "float64",
        "rendering": "string",
        "template": "string",
        "tool_version": "string",
        "date": "string",
        "n_params": "int64",
        "step": "int64",
        "status": "string",
        "error": "string",
    }.items():
        assert f[col].dtype == kind, col
    rows = ds.to_list()
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["task"] for r in failed} == {"parity", "polynomial"} and len(failed) == 2
    assert all("not a causal language model" in r["error"] and r["layer"] is None for r in failed)
    ok = [r for r in rows if r["status"] == "ok"]
    # per task: 3 bundled (2 layers x 1 head) + zoo-gpt2, tiny-iter at 2 revisions, zoo-llama (2 layers x 4 heads)
    assert len(ok) == 2 * (3 * 2 + 4 * 8)
    assert {(r["model"], r["layer"], r["head"]) for r in ok if r["task"] == "parity" and r["model"] == "parity-cot"} == {
        ("parity-cot", 0, 0),
        ("parity-cot", 1, 0),
    }
    best = next(r for r in ok if r["model"] == "parity-cot" and r["task"] == "parity" and r["rank"] == 1)
    assert (best["layer"], best["head"], best["detected"], best["ablated"]) == (1, 0, True, True)
    assert best["clean_token_accuracy"] > 0.9 and best["tool_version"] and best["rendering"] == "native"


def test_hub_revisions_by_repo_id(atlas):
    from datasets import Dataset

    out = atlas[0]
    rows = [r for r in Dataset.from_parquet(str(out / "results.parquet")).to_list() if r["model"] == "tiny-org/tiny-iter"]
    assert {(r["revision"], r["commit"], r["step"]) for r in rows} == {
        ("main", COMMITS["main"], None),
        ("step100", COMMITS["step100"], 100),
    }
    by_rev = {r["revision"]: r["iteration_score"] for r in rows if (r["task"], r["layer"], r["head"]) == ("parity", 0, 0)}
    assert by_rev["main"] != by_rev["step100"]  # two snapshots, two different models


def test_resume_skips_finished_and_adds_new(atlas):
    out, _, run2, mtimes = atlas
    assert "scanned 2 of 16" in run2.stdout and "(14 already done)" in run2.stdout, run2.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    assert all(after[k] == v for k, v in mtimes.items()) and len(after) == len(mtimes) + 2
    assert "zoo-llama" in (out / "summary.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_other_settings_and_bad_input_are_one_line(atlas, zoo):
    out, env = atlas[0], zoo[2]
    cases = [
        (
            ["parity-cot", "--tasks", "parity,polynomial", "--n", "7", "--lengths", "4-5", "--output-dir", str(out)],
            "other settings",
        ),
        (["parity-cot", "--tasks", "sorting", "--output-dir", str(out / "x")], "unknown task 'sorting'"),
        (["parity-cot@main", "--output-dir", str(out / "x")], "has no revisions"),
        (["--output-dir", str(out / "x")], "no models to scan"),
        (["parity-cot", "--dry-run", "--output-dir", str(out / "x")], "--dry-run goes with --push-to-hub"),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", CLI_SCRIPT, json.dumps([["scan", *a] for a, _ in cases])],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for run, (_, needle) in zip(json.loads(proc.stdout.strip().splitlines()[-1]), cases):
        lines = run["stderr"].strip().splitlines()
        assert run["rc"] == 2 and len(lines) == 1 and lines[0].startswith("hf-iterheads scan: error:") and needle in lines[0], (
            run["stderr"]
        )
    assert not (out / "x").exists()


def test_summary_figures_and_report(atlas):
    out = atlas[0]
    summary = (out / "summary.md").read_text()
    assert "| parity-cot | parity | L1H0 |" in summary and "## Failures" in summary and "not a causal language model" in summary
    for name in ("best_score_vs_params.png", "layer_profiles.png", "emergence.png"):
        assert (out / "figures" / name).stat().st_size > 5000, name
    report = (out / "report.html").read_text()
    assert report.count('<section id="') == 14 and "<h2>Models</h2>" in report and 'href="#s' in report
    assert "http://" not in report.replace("http://www.w3.org", "") and "<script src" not in report and "<link" not in report


def test_dry_run_folder_loads_with_load_dataset(atlas):
    from datasets import Dataset, load_dataset
    from huggingface_hub import DatasetCard

    out, _, run2, _ = atlas
    hub = out / "hub"
    assert "dry run" in run2.stdout and str(hub) in run2.stdout
    heads = load_dataset(str(hub), split="train")
    assert len(heads) == len(Dataset.from_parquet(str(out / "results.parquet")))
    assert "iteration_score" in heads.column_names
    summary = load_dataset(str(hub), "summary", split="train")
    assert len(summary) == 16 and {"best_score", "best_baseline", "detected", "causal"} <= set(summary.column_names)
    card = DatasetCard.load(hub / "README.md")
    assert [c["config_name"] for c in card.data.configs] == ["heads", "summary"]
    assert (
        "arxiv.org/abs/2406.02128" in card.text
        and "`iteration_score` (float64)" in card.text
        and "hf-iterheads 0.1.0" in card.text
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes_share_and_merge(zoo):
    tmp, f, env = zoo
    out = tmp / "sharded"
    # accelerate's torchrun-based launcher (--multi_gpu) starts 2 processes; on CPUs they join a gloo group
    # (`--cpu` alone would need mpirun for several processes)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "hf_iterheads.cli",
        "scan",
        str(f["zoo-gpt2"]),
        str(f["zoo-llama"]),
        "--tasks",
        "parity",
        "--n",
        "4",
        "--lengths",
        "4",
        "--maps",
        "1",
        "--output-dir",
        str(out),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("scanned 2 of 2") == 1 and "on 2 process(es)" in run.stdout  # the main process merges
    workers = {json.loads(p.read_text())["worker"] for p in (out / "parts").iterdir()}
    assert workers == {"0/2", "1/2"}
    from datasets import Dataset

    assert len(Dataset.from_parquet(str(out / "results.parquet"))) == 2 * 8


def test_model_specs_files_revisions_and_options(tmp_path):
    from hf_iterheads.detect.scan import model_specs, part_key, split_options, step_of
    from hf_iterheads.errors import IterHeadsError

    listing = tmp_path / "models.txt"
    listing.write_text("# the atlas\nEleutherAI/pythia-160m@step1000,main  # two steps\n\nparity-cot\ngpt2\n")
    specs = model_specs(["Qwen/Qwen2.5-0.5B"], str(listing), revisions="main,step8000")
    assert specs == [
        ("Qwen/Qwen2.5-0.5B", "main"),
        ("Qwen/Qwen2.5-0.5B", "step8000"),
        ("EleutherAI/pythia-160m", "step1000"),
        ("EleutherAI/pythia-160m", "main"),
        ("parity-cot", None),  # bundled: no revisions
        ("gpt2", "main"),
        ("gpt2", "step8000"),
    ]
    assert (step_of("step143000"), step_of("main"), step_of("ckpt-step_20")) == (143000, None, 20)
    assert part_key("a/b", "main", "parity") != part_key("a_b", "main", "parity")
    load, det = split_options({"dtype": "float32", "trust_remote_code": False, "top_k": 2, "rendering": "auto"})
    assert set(load) == {"dtype", "trust_remote_code"} and set(det) == {"top_k", "rendering"}
    with pytest.raises(IterHeadsError, match="no option --warp-speed"):
        split_options({"warp_speed": 9})
    with pytest.raises(IterHeadsError, match="not a file"):
        model_specs([], str(tmp_path / "missing.txt"))


# --- the text organism as the scan's control ------------------------------------------------------------------

GPT2_TOK = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "gpt2"


@pytest.mark.skipif(not GPT2_TOK.is_dir(), reason="no ../shared/tokenizers/gpt2 (not in a user's clone)")
def test_a_text_scan_runs_the_organism_per_template_and_flags_where_its_head_is_not_found(tmp_path):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2-random"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_layer=2, n_head=2, n_embd=16, n_positions=128)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(GPT2_TOK).save_pretrained(folder)
    env = _env(tmp_path / "hf_home")
    out = tmp_path / "atlas"
    templates = ["--template", "{inputs} -> {states}", "--template", "{inputs} => {states} ;"]
    run = _cli([str(folder), "--tasks", "parity", "--n", "6", "--lengths", "4-6", "--maps", "1", *templates, "--output-dir", str(out)], env)
    assert run.returncode == 0, run.stderr[-3000:]
    control = json.loads((out / "control.json").read_text())
    rows = {r["template"]: r for r in control["templates"]}
    assert rows["{inputs} -> {states}"]["found"] and rows["{inputs} -> {states}"]["trained"]
    held = rows["{inputs} => {states} ;"]
    assert not held["found"] and not held["trained"] and held["drop"] > 0.3
    summary = (out / "summary.md").read_text()
    assert "## Control: the text organism" in summary and "**FLAG**" in summary and "{inputs} => {states} ;" in summary
    assert summary.count("**FLAG**") == 1 and "FLAG control" in run.stdout
    report = (out / "report.html").read_text()
    assert '<section id="control">' in report and "NOT found under template" in report
    # the LLM's own section carries the flag too, and --no-control removes the control
    assert report.count('class="flag">control: the text organism') >= 2
    again = _cli([str(folder), "--tasks", "parity", "--n", "6", "--lengths", "4-6", "--maps", "1", *templates, "--no-control",
                  "--output-dir", str(out)], env)
    assert again.returncode == 0 and not (out / "control.json").exists()
    assert "Control: the text organism" not in (out / "summary.md").read_text()
