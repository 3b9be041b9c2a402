"""Bad inputs, entry point by entry point: each is one line on stderr (exit status 2), never a traceback, and
leaves every file and folder as it was.

The table is one list of ``(id, argv, expected substring)`` per entry point family; ``{w}`` in an argument is
the shared folder of prepared inputs (see ``world``), ``{port}`` an unused localhost port. To add an entry
point: add a list and a test that calls :func:`check_case` with the entry point's runner.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hf_iterheads.cli import main
from hf_iterheads.modeling import bundled_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "dataset_scripts" / "build_datasets.py"
Case = tuple[str, list[str], str]

# --- the prepared inputs ------------------------------------------------------------------------------------

BAD_METRICS = {
    "run-badjson": '{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "eval", "step": 2,\n',
    "run-array": '{"kind": "train", "step": 1, "loss": 1.0}\n[1, 2]\n',
    "run-nostep": '{"kind": "eval", "task": "parity", "accuracy": 0.5}\n',
    "run-notask": '{"kind": "eval", "step": 3, "accuracy": 0.5}\n',
    "run-badloss": '{"kind": "train", "step": 1, "loss": "low"}\n',
    "run-badstep": '{"kind": "train", "step": "ten", "loss": 1.0}\n',
}
GOOD_METRICS = '{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "eval", "step": 1, "task": "parity", "accuracy": 0.5}\n'


def _link_checkpoint(dest: Path) -> Path:
    """A copy of the bundled polynomial-cot checkpoint (hard links: nothing here is ever written)."""
    shutil.copytree(bundled_path("polynomial-cot"), dest, copy_function=os.link)
    return dest


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs every case may point at; no case may change any of them."""
    w = tmp_path_factory.mktemp("world")
    (w / "file.txt").write_text("not a folder\n")
    (w / "full").mkdir()
    (w / "full" / "keep.txt").write_text("mine\n")
    (w / "empty").mkdir()
    trunc = w / "trunc"
    trunc.mkdir()
    src = bundled_path("polynomial-cot")
    for f in src.iterdir():
        if f.name != "model.safetensors":
            os.link(f, trunc / f.name)
    data = (src / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])  # as a killed copy leaves it
    _link_checkpoint(w / "ckpt")
    for name, file, text in (("badcfg", "config.json", '{"model_type": "gpt2", "n_layer": "two"}'),
                             ("badtok", "tokenizer.json", "not json")):
        _link_checkpoint(w / name)
        (w / name / file).unlink()
        (w / name / file).write_text(text)
    pickled = _link_checkpoint(w / "pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    for name, text in {**BAD_METRICS, "run-ok": GOOD_METRICS, "run-plotsfile": GOOD_METRICS}.items():
        (w / name).mkdir()
        (w / name / "metrics.jsonl").write_text(text)
    (w / "run-plotsfile" / "plots").write_text("a file where plot's default folder goes\n")
    (w / "run-binary").mkdir()
    (w / "run-binary" / "metrics.jsonl").write_bytes(b'{"kind": "train", "step": 1, "loss": 1.0}\n\xff\xfe\n')
    (w / "repro-quick").mkdir()
    (w / "repro-quick" / "reproduce.json").write_text('{"scale": "quick"}\n')
    (w / "repro-bad").mkdir()
    (w / "repro-bad" / "reproduce.json").write_text("garbage\n")
    (w / "README-noblock.md").write_text("# a README without the results block\n")
    from hf_iterheads.training import TrainConfig

    (w / "stored").mkdir()  # a run's settings, as train writes them: resume reads them back
    TrainConfig(tasks=["parity"], output_dir=str(w / "stored"), max_steps=2).save(w / "stored" / "run_config.json")
    stored = json.loads((w / "stored" / "run_config.json").read_text())
    for name, text in {"stored-badjson": '{"tasks": ["parity"], "lr": ', "stored-array": "[1, 2]",  # hand edits
                       "stored-badtype": json.dumps({**stored, "lr": "fast"}),
                       "stored-badvalue": json.dumps({**stored, "batch_size": -4}),
                       "stored-inf": json.dumps({**stored, "lr": float("inf")})}.items():
        (w / name).mkdir()
        (w / name / "run_config.json").write_text(text)
    _bidirectional_bert(w / "bert")
    return w


def _bidirectional_bert(dest: Path) -> None:
    """A tiny BERT saved as ``BertLMHeadModel`` without ``is_decoder``: it loads as a causal LM but is not one."""
    from transformers import BertConfig, BertLMHeadModel

    from hf_iterheads.tokenizer import build_tokenizer, save_tokenizer

    tok = build_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, is_decoder=False)
    BertLMHeadModel(config).save_pretrained(dest)
    save_tokenizer(tok, dest)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: folders by name, files by size and modification time (so a rewrite shows)."""
    seen: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            seen[os.path.relpath(os.path.join(dirpath, name), root)] = ("dir",)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            seen[os.path.relpath(os.path.join(dirpath, name), root)] = ("file", st.st_size, st.st_mtime_ns)
    return seen


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill(argv: list[str], world: Path) -> list[str]:
    return [a.replace("{w}", str(world)) for a in argv]


# --- the shared assertion ------------------------------------------------------------------------------------


def check_case(run: Callable[[list[str]], tuple[int, str]], argv: list[str], expected: str, prefix: str,
               world: Path) -> str:
    """Run one bad input; assert exit 2, exactly one stderr line ``PREFIX: error: ...`` holding ``expected``,
    no traceback, and no file or folder created, removed or changed in ``world`` (the cwd as well)."""
    before = snapshot(world)
    code, err = run(_fill(argv, world))
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    assert expected in lines[0], lines[0]
    after = snapshot(world)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    return lines[0]


@pytest.fixture
def in_world(world, monkeypatch) -> Path:
    monkeypatch.chdir(world)  # a relative path a command might create lands where the snapshot sees it
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # as conftest's HF_HUB_OFFLINE=1 says
    return world


def cli_runner(capsys) -> Callable[[list[str]], tuple[int, str]]:
    """``hf-iterheads ...`` in-process: an escaping exception fails the test, just as a traceback would show."""

    def run(argv: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        code = main(argv)
        return code, capsys.readouterr().err

    return run


def script_runner(capsys) -> Callable[[list[str]], tuple[int, str]]:
    """``python dataset_scripts/build_datasets.py ...`` in-process (its own main, its own parser)."""
    spec = importlib.util.spec_from_file_location("build_datasets_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(argv: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        code = module.main(argv)
        return code, capsys.readouterr().err

    return run


# --- the table ---------------------------------------------------------------------------------------------

OUT = "{w}/new-out"  # an output path that does not exist: it must still not exist after the case

DATASET_CASES: list[Case] = [
    ("proc", ["--output-dir", "/proc/x"], "cannot write output path /proc/x"),
    ("proc-deep", ["--output-dir", "/proc/x/y/z"], "cannot write output path /proc/x/y/z"),
    ("sys", ["--output-dir", "/sys/x"], "cannot write output path /sys/x"),
    ("parent-is-file", ["--output-dir", "{w}/file.txt/sub"], "file.txt is a file, not a folder"),
    ("output-is-file", ["--output-dir", "{w}/file.txt"], "is a file; a folder is expected"),
    ("output-not-empty", ["--output-dir", "{w}/full"], "not empty"),
    ("output-empty-string", ["--output-dir", ""], "--output-dir is empty"),
    ("no-output-dir", ["--tasks", "parity"], "required: --output-dir"),
    ("seed-negative", ["--output-dir", OUT, "--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    ("seed-not-int", ["--output-dir", OUT, "--seed", "x"], "argument --seed"),
    ("tasks-twice", ["--output-dir", OUT, "--tasks", "parity", "parity"], "parity more than once"),
    ("tasks-twice-comma", ["--output-dir", OUT, "--tasks", "parity,polynomial,parity"], "parity more than once"),
    ("tasks-none", ["--output-dir", OUT, "--tasks", ","], "--tasks names no task"),
    ("task-unknown", ["--output-dir", OUT, "--tasks", "fibonacci"], "unknown task 'fibonacci'"),
    ("cumsum-mod1", ["--output-dir", OUT, "--tasks", "cumsum_mod1"], "modulus must be"),
    ("n-len-0", ["--output-dir", OUT, "--n-len", "0"], "argument --n-len: must be at least 1"),
    ("per-length-0", ["--output-dir", OUT, "--per-length", "0"], "argument --per-length"),
    ("per-length-float", ["--output-dir", OUT, "--per-length", "1.5"], "argument --per-length"),
    ("push-no-slash", ["--output-dir", OUT, "--push-to-hub", "noslash"], "ORG/NAME"),
    ("push-empty-name", ["--output-dir", OUT, "--push-to-hub", "acme/"], "ORG/NAME"),
    ("push-offline", ["--output-dir", OUT, "--tasks", "parity", "--n-len", "2", "--per-length", "2",
                      "--push-to-hub", "acme/tasks"], "HF_HUB_OFFLINE=1 is set"),
    ("private-without-push", ["--output-dir", OUT, "--private"], "--private only applies with --push-to-hub"),
    ("unknown-flag", ["--output-dir", OUT, "--bogus"], "unrecognized arguments: --bogus"),
    ("n-len-over-limit", ["--output-dir", OUT, "--n-len", "10000"], "over the limit of 4096"),
    ("memory-over-limit", ["--output-dir", OUT, "--n-len", "4096", "--per-length", "100000000"],
     "over the limit of half the memory available"),
    ("cumsum-huge-modulus", ["--output-dir", OUT, "--tasks", "cumsum_mod99999999999"], "modulus must be"),
    ("threads-0", ["--output-dir", OUT, "--threads", "0"], "argument --threads"),
    ("overwrite-not-a-dataset", ["--output-dir", "{w}/full", "--overwrite"], "not written by hf-iterheads build-datasets"),
    ("overwrite-a-checkpoint", ["--output-dir", "{w}/ckpt", "--overwrite"], "not written by hf-iterheads build-datasets"),
]

EVAL_CASES: list[Case] = [
    ("batch-size-0", ["polynomial-cot", "--task", "polynomial", "--batch-size", "0"], "argument --batch-size"),
    ("batch-size-negative", ["polynomial-cot", "--task", "polynomial", "--batch-size", "-4"], "argument --batch-size"),
    ("per-length-0", ["polynomial-cot", "--task", "polynomial", "--per-length", "0"], "argument --per-length"),
    ("n-len-0", ["polynomial-cot", "--task", "polynomial", "--n-len", "0"], "argument --n-len"),
    ("seed-negative", ["polynomial-cot", "--task", "polynomial", "--seed", "-1"], "argument --seed"),
    ("output-is-dir", ["polynomial-cot", "--task", "polynomial", "-o", "{w}/empty"], "is a folder; a file path is expected"),
    ("output-is-full-dir", ["polynomial-cot", "--task", "polynomial", "-o", "{w}/full"], "is a folder"),
    ("output-proc", ["polynomial-cot", "--task", "polynomial", "-o", "/proc/x.json"], "cannot write output path /proc/x.json"),
    ("output-parent-is-file", ["polynomial-cot", "--task", "polynomial", "-o", "{w}/file.txt/e.json"], "is a file, not a folder"),
    ("output-device", ["polynomial-cot", "--task", "polynomial", "-o", "/dev/null"], "not a regular file"),
    ("output-empty", ["polynomial-cot", "--task", "polynomial", "-o", ""], "--output is empty"),
    ("truncated-weights", ["{w}/trunc", "--task", "polynomial"], "weights file is damaged or incomplete"),
    ("config-field-wrong-type", ["{w}/badcfg", "--task", "polynomial"], "cannot load a model and tokenizer"),
    ("tokenizer-not-json", ["{w}/badtok", "--task", "polynomial"], "cannot load a model and tokenizer"),
    ("model-missing", ["{w}/nope", "--task", "polynomial"], "no such folder, and not a bundled checkpoint"),
    ("model-is-file", ["{w}/file.txt", "--task", "polynomial"], "is a file; expected a checkpoint folder"),
    ("model-not-checkpoint", ["{w}/empty", "--task", "polynomial"], "not a model checkpoint"),
    ("task-twice", ["polynomial-cot", "--task", "polynomial,polynomial"], "polynomial more than once"),
    ("task-unknown", ["polynomial-cot", "--task", "fibonacci"], "unknown task"),
    ("task-none", ["polynomial-cot", "--task", ","], "--task names no task"),
    ("task-missing", ["polynomial-cot"], "--task"),
    ("lengths-garbage", ["polynomial-cot", "--task", "polynomial", "--lengths", "x"], "cannot read lengths"),
    ("lengths-zero", ["polynomial-cot", "--task", "polynomial", "--lengths", "0"], "at least 1"),
    ("lengths-too-long", ["polynomial-cot", "--task", "polynomial", "--lengths", "1-99"], "does not fit"),
    ("dataset-missing", ["polynomial-cot", "--task", "polynomial", "--dataset", "{w}/nope", "--lengths", "4"],
     "cannot load the test split"),
    ("output-is-model-config", ["{w}/ckpt", "--task", "polynomial", "-o", "{w}/ckpt/config.json"], "inside the evaluated model"),
    ("output-inside-model", ["{w}/ckpt", "--task", "polynomial", "-o", "{w}/ckpt/eval.json"], "inside the evaluated model"),
    ("threads-0", ["polynomial-cot", "--task", "polynomial", "--threads", "0"], "argument --threads"),
]

PLOT_CASES: list[Case] = [
    ("length-0", ["{w}/run-ok", "--length", "0"], "argument --length: must be at least 1"),
    ("length-negative", ["{w}/run-ok", "--length", "-3"], "argument --length"),
    ("seed-negative", ["{w}/run-ok", "--seed", "-1"], "argument --seed"),
    ("metrics-bad-json", ["{w}/run-badjson"], "metrics.jsonl line 2 is not valid JSON"),
    ("metrics-not-object", ["{w}/run-array"], "metrics.jsonl line 2 is not a JSON object"),
    ("metrics-no-step", ["{w}/run-nostep"], "record 1 (eval) has no 'step'"),
    ("metrics-no-task", ["{w}/run-notask"], "has no 'task'"),
    ("metrics-loss-not-number", ["{w}/run-badloss"], "loss that is not a number"),
    ("metrics-step-not-int", ["{w}/run-badstep"], "step that is not an integer"),
    ("metrics-not-utf8", ["{w}/run-binary"], "line 2 is not UTF-8"),
    ("output-proc", ["{w}/run-ok", "--output-dir", "/proc/x"], "cannot write output path /proc/x"),
    ("output-is-file", ["{w}/run-ok", "--output-dir", "{w}/file.txt"], "is a file; a folder is expected"),
    ("output-parent-is-file", ["{w}/run-ok", "--output-dir", "{w}/file.txt/p"], "is a file, not a folder"),
    ("default-output-is-file", ["{w}/run-plotsfile"], "plots is a file"),
    ("run-missing", ["{w}/nope"], "does not exist"),
    ("run-is-file", ["{w}/file.txt"], "is a file; expected a run directory"),
    ("nothing-to-plot", ["{w}/empty"], "nothing to plot"),
    ("truncated-weights", ["{w}/trunc"], "weights file is damaged or incomplete"),
    ("config-field-wrong-type", ["{w}/badcfg"], "cannot load a model and tokenizer"),
    ("length-beyond-context", ["{w}/ckpt", "--length", "99"], "does not fit"),
    ("task-unknown", ["{w}/ckpt", "--task", "fibonacci"], "unknown task"),
    ("task-without-checkpoint", ["{w}/run-ok", "--task", "parity"], "no final checkpoint yet: --task and --length"),
    ("length-without-checkpoint", ["{w}/run-ok", "--length", "4"], "no model to draw it from"),
    ("threads-0", ["{w}/run-ok", "--threads", "0"], "argument --threads"),
]

REPRODUCE_CASES: list[Case] = [
    ("workers-0", ["--output-dir", OUT, "--workers", "0"], "argument --workers: must be at least 1"),
    ("workers-negative", ["--output-dir", OUT, "--workers", "-1"], "argument --workers"),
    ("workers-not-int", ["--output-dir", OUT, "--workers", "two"], "argument --workers"),
    ("threads-negative", ["--output-dir", OUT, "--threads", "-2"], "argument --threads: must be at least 1"),
    ("threads-0", ["--output-dir", OUT, "--threads", "0"], "argument --threads"),
    ("render-only-new", ["--output-dir", OUT, "--render-only"], "nothing to report"),
    ("render-only-empty", ["--output-dir", "{w}/empty", "--render-only"], "nothing to report"),
    ("render-only-no-runs", ["--output-dir", "{w}/repro-quick", "--render-only"], "holds no finished --quick run"),
    ("render-only-overwrite", ["--output-dir", "{w}/repro-quick", "--render-only", "--overwrite"],
     "--overwrite would discard them"),
    ("proc", ["--output-dir", "/proc/x"], "cannot write output path /proc/x"),
    ("output-is-file", ["--output-dir", "{w}/file.txt"], "is a file; a folder is expected"),
    ("parent-is-file", ["--output-dir", "{w}/file.txt/r"], "is a file, not a folder"),
    ("not-a-reproduction", ["--output-dir", "{w}/full"], "not a reproduction folder"),
    ("other-scale", ["--smoke", "--output-dir", "{w}/repro-quick"], "pass --overwrite"),
    ("damaged-marker", ["--output-dir", "{w}/repro-bad"], "reproduce.json is damaged"),
    ("readme-missing", ["--output-dir", OUT, "--update-readme", "{w}/nope.md"], "does not exist"),
    ("readme-is-folder", ["--output-dir", OUT, "--update-readme", "{w}/empty"], "is a folder, not a file"),
    ("readme-no-block", ["--output-dir", OUT, "--update-readme", "{w}/README-noblock.md"], "block to fill"),
    ("two-scales", ["--quick", "--full", "--output-dir", OUT], "not allowed with argument"),
    ("no-output-dir", ["--quick"], "required: --output-dir"),
]

RELEASE_CASES: list[Case] = [
    ("repo-no-slash", ["--repo-id", "noslash", "--dry-run", "--output-dir", OUT], "ORG/NAME"),
    ("repo-three-parts", ["--repo-id", "a/b/c", "--dry-run", "--output-dir", OUT], "ORG/NAME"),
    ("repo-empty-org", ["--repo-id", "/x", "--dry-run", "--output-dir", OUT], "ORG/NAME"),
    ("checkpoint-missing", ["--repo-id", "acme/x", "--checkpoint", "{w}/nope", "--dry-run", "--output-dir", OUT],
     "neither a checkpoint folder nor a bundled checkpoint"),
    ("checkpoint-is-file", ["--repo-id", "acme/x", "--checkpoint", "{w}/file.txt", "--dry-run", "--output-dir", OUT],
     "is a file"),
    ("checkpoint-not-a-checkpoint", ["--repo-id", "acme/x", "--checkpoint", "{w}/empty", "--dry-run", "--output-dir", OUT],
     "not a releasable checkpoint"),
    ("truncated-weights", ["--repo-id", "acme/x", "--checkpoint", "{w}/trunc", "--dry-run", "--output-dir", OUT],
     "weights file is damaged or incomplete"),
    ("config-field-wrong-type", ["--repo-id", "acme/x", "--checkpoint", "{w}/badcfg", "--dry-run", "--output-dir", OUT],
     "does not load with plain transformers"),
    ("pickled-weights", ["--repo-id", "acme/x", "--checkpoint", "{w}/pickled", "--dry-run", "--output-dir", OUT],
     "pickled weights"),
    ("dry-run-without-output", ["--repo-id", "acme/x", "--dry-run"], "--dry-run needs --output-dir"),
    ("output-without-dry-run", ["--repo-id", "acme/x", "--output-dir", OUT], "only apply with --dry-run"),
    ("output-proc", ["--repo-id", "acme/x", "--dry-run", "--output-dir", "/proc/x"], "cannot write output path /proc/x"),
    ("output-is-file", ["--repo-id", "acme/x", "--dry-run", "--output-dir", "{w}/file.txt"], "is a file; a folder"),
    ("output-not-empty", ["--repo-id", "acme/x", "--dry-run", "--output-dir", "{w}/full"], "not empty"),
    ("output-parent-is-file", ["--repo-id", "acme/x", "--dry-run", "--output-dir", "{w}/file.txt/r"], "is a file, not a folder"),
    ("offline-upload", ["--repo-id", "acme/x"], "HF_HUB_OFFLINE=1 is set"),
    ("no-repo-id", ["--dry-run", "--output-dir", OUT], "required: --repo-id"),
    ("overwrite-the-checkpoint", ["--repo-id", "acme/x", "--checkpoint", "{w}/ckpt", "--dry-run", "--output-dir", "{w}/ckpt",
                                  "--overwrite"], "is the --checkpoint"),
    ("output-inside-checkpoint", ["--repo-id", "acme/x", "--checkpoint", "{w}/ckpt", "--dry-run", "--output-dir",
                                  "{w}/ckpt/release"], "inside the --checkpoint"),
    ("overwrite-not-a-release", ["--repo-id", "acme/x", "--dry-run", "--output-dir", "{w}/full", "--overwrite"],
     "not written by hf-iterheads release"),
]

# Run as real processes: the network cases need the Hub client configured from the environment at import.
SUBPROCESS_CASES: list[Case] = [
    ("release-no-network", ["-m", "hf_iterheads.cli", "release", "--repo-id", "acme/x"],
     "no network / Hub unreachable"),
    ("script-push-no-network", [str(SCRIPT), "--output-dir", OUT, "--tasks", "parity", "--push-to-hub", "acme/x"],
     "no network / Hub unreachable"),
    ("script-seed-negative", [str(SCRIPT), "--output-dir", OUT, "--seed", "-1"], "argument --seed"),
]


def _ids(cases: list[Case]) -> list[str]:
    return [c[0] for c in cases]


# --- one test per entry point family -------------------------------------------------------------------------


@pytest.mark.parametrize("case", DATASET_CASES, ids=_ids(DATASET_CASES))
def test_dataset_script(case, in_world, capsys):
    _, argv, expected = case
    check_case(script_runner(capsys), argv, expected, "build_datasets.py", in_world)


@pytest.mark.parametrize("case", DATASET_CASES, ids=_ids(DATASET_CASES))
def test_build_datasets(case, in_world, capsys):
    _, argv, expected = case
    check_case(cli_runner(capsys), ["build-datasets", *argv], expected, "hf-iterheads build-datasets", in_world)


@pytest.mark.parametrize("case", EVAL_CASES, ids=_ids(EVAL_CASES))
def test_eval(case, in_world, capsys):
    _, argv, expected = case
    check_case(cli_runner(capsys), ["eval", *argv], expected, "hf-iterheads eval", in_world)


@pytest.mark.parametrize("case", PLOT_CASES, ids=_ids(PLOT_CASES))
def test_plot(case, in_world, capsys):
    pytest.importorskip("matplotlib")
    _, argv, expected = case
    check_case(cli_runner(capsys), ["plot", *argv], expected, "hf-iterheads plot", in_world)


@pytest.mark.parametrize("case", REPRODUCE_CASES, ids=_ids(REPRODUCE_CASES))
def test_reproduce(case, in_world, capsys):
    _, argv, expected = case
    check_case(cli_runner(capsys), ["reproduce", *argv], expected, "hf-iterheads reproduce", in_world)


@pytest.mark.parametrize("case", RELEASE_CASES, ids=_ids(RELEASE_CASES))
def test_release(case, in_world, capsys):
    _, argv, expected = case
    check_case(cli_runner(capsys), ["release", *argv], expected, "hf-iterheads release", in_world)


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=_ids(SUBPROCESS_CASES))
def test_as_processes(case, in_world):
    """The real command lines, with no Hub reachable: HF_ENDPOINT is an unused localhost port, offline mode off."""
    _, argv, expected = case
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_unused_port()}", HF_TOKEN="hf_not_a_real_token",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))

    def run(args: list[str]) -> tuple[int, str]:
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=in_world, timeout=300)
        return done.returncode, done.stderr

    prefix = "hf-iterheads release" if "release" in argv else "build_datasets.py"
    line = check_case(run, argv, expected, prefix, in_world)
    if "no network" in expected:
        assert ("--dry-run" in line) == ("release" in argv), line  # release suggests the dry run


# --- what the table cannot say -------------------------------------------------------------------------------


def test_eval_refuses_a_folder_output_before_any_work(in_world, capsys, monkeypatch):
    """A slow case made fast: the output is refused before the checkpoint is even loaded."""

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the output path was checked")

    monkeypatch.setattr("hf_iterheads.modeling.load_checkpoint", never)
    check_case(cli_runner(capsys), ["eval", "polynomial-cot", "--task", "polynomial", "-o", "{w}/empty"],
               "is a folder", "hf-iterheads eval", in_world)


def test_eval_on_a_task_the_checkpoint_never_saw_warns_and_evaluates(tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "polynomial-cot", "--task", "parity", "--lengths", "4", "--per-length", "8", "--no-generate", "-o", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "not trained on 'parity'" in warnings[0] and "polynomial" in warnings[0]
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    assert main(["eval", "polynomial-cot", "--task", "polynomial", "--lengths", "4", "--per-length", "8",
                 "--no-generate", "-o", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["build-datasets", "train", "eval", "plot", "detect", "reproduce", "release"])
def test_help_still_works(verb, capsys):
    assert main([verb, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: hf-iterheads {verb}")


NO_TORCH_ARGV = [["--help"], ["fly"], ["train", "--help"], ["train", "--lr", "x"], ["train", "--bogus", "--output-dir", "x"],
                 ["eval", "--help"], ["eval", "m", "--batch-size", "0"], ["build-datasets", "--help"],
                 ["build-datasets", "--output-dir", "x", "--n-len", "0"], ["release", "--help"], ["reproduce", "--help"],
                 ["plot", "--help"], ["detect", "--help"], ["tasks", "--help"]]


@pytest.mark.parametrize("argv", NO_TORCH_ARGV, ids=[" ".join(a) for a in NO_TORCH_ARGV])
def test_help_and_argparse_errors_answer_before_torch_is_imported(argv):
    """``--help`` and a mistyped flag answer at once: neither torch nor transformers is imported for them."""
    code = ("import sys; from hf_iterheads.cli import main; status = main(sys.argv[1:]); "
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules); "
            "print('HEAVY', heavy, file=sys.stderr); sys.exit(status)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 2) and "HEAVY []" in done.stderr, done.stderr


def test_debug_shows_the_traceback_behind_the_line(in_world, capsys):
    """``--debug`` (before or after the command): the exception the one line replaced, with its traceback, then the
    same line."""
    for argv in (["--debug", "eval", "{w}/trunc", "--task", "polynomial"], ["eval", "{w}/trunc", "--task", "polynomial", "--debug"]):
        assert main(_fill(argv, in_world)) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert lines[0].startswith("Traceback") and "IterHeadsError" not in lines[-2], err
        assert lines[-1].startswith("hf-iterheads eval: error: ") and "damaged or incomplete" in lines[-1]


def test_script_help_still_works(capsys):
    spec = importlib.util.spec_from_file_location("build_datasets_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: build_datasets.py")


def test_top_level_errors_are_one_line(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "hf-iterheads: error: the following arguments are required: COMMAND"]
    assert main(["fly"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-iterheads: error: argument COMMAND: invalid choice: 'fly'")


def test_the_writability_probe_leaves_nothing(tmp_path):
    from hf_iterheads.errors import IterHeadsError
    from hf_iterheads.outputs import PROBE_PREFIX, check_writable

    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_writable(tmp_path / "x.json", "file") == tmp_path / "x.json"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(IterHeadsError, match="cannot write"):
        check_writable("/proc/new")
    assert not any(p.name.startswith(PROBE_PREFIX) for p in tmp_path.iterdir())


def test_case_count():
    """At least 85 cases over all 8 entry points."""
    n = 2 * len(DATASET_CASES) + len(EVAL_CASES) + len(PLOT_CASES) + len(REPRODUCE_CASES) + len(RELEASE_CASES)
    assert n + len(SUBPROCESS_CASES) + len(TRAIN_CASES) + len(DETECT_CASES) >= 85 + 60


# --- train ------------------------------------------------------------------------------------------------

TRAIN = ["train", "--task", "parity", "--max-steps", "2", "--report-to", "none", "--output-dir", "{w}/new"]
TRAIN_CASES: list[Case] = [
    (name, TRAIN + extra, expected) for name, extra, expected in [
        ("unknown-task", ["--task", "polynomal"], "unknown task"),
        ("no-task", ["--task", ""], "give at least one task"),
        ("task-twice", ["--task", "parity,parity"], "names a task twice"),
        ("task-weights-text", ["--task", "parity,polynomial", "--task-weights", "a,b"], "--task-weights"),
        ("task-weights-count", ["--task", "parity,polynomial", "--task-weights", "1"], "one per task"),
        ("task-weights-negative", ["--task", "parity,polynomial", "--task-weights", "1,-1"], "non-negative"),
        ("threads-negative", ["--threads", "-3"], "--threads must be 0 or more"),
        ("seed-negative", ["--seed", "-1"], "--seed must be 0 or more"),
        ("data-seed-negative", ["--data-seed", "-1"], "--data-seed must be 0 or more"),
        ("out-proc", ["--output-dir", "/proc/x"], "cannot write"),
        ("out-under-file", ["--output-dir", "{w}/file.txt/run"], "is a file"),
        ("out-is-file", ["--output-dir", "{w}/file.txt"], "is a file, not a directory"),
        ("out-not-empty", ["--output-dir", "{w}/full"], "not empty"),
        ("overwrite-not-a-run", ["--output-dir", "{w}/full", "--overwrite"], "does not look like a training run"),
        ("preset", ["--preset", "huge"], "unknown model preset"),
        ("recipe", ["--recipe", "slow"], "unknown recipe"),
        ("lr-zero", ["--lr", "0"], "--lr must be > 0"),
        ("betas-range", ["--betas", "2,3"], "--betas"),
        ("betas-text", ["--betas", "x,y"], "--betas"),
        ("batch-zero", ["--batch-size", "0"], "--batch-size must be at least 1"),
        ("eval-every-zero", ["--eval-every", "0"], "--eval-every must be at least 1"),
        ("max-steps-zero", ["--max-steps", "0"], "positive --epochs or --max-steps"),
        ("epochs-and-steps", ["--epochs", "1"], "not allowed with"),
        ("schedule", ["--schedule", "sometimes"], "invalid choice"),
        ("mixed-precision", ["--mixed-precision", "fp8"], "invalid choice"),
        ("data", ["--data", "streaming"], "invalid choice"),
        ("n-len-zero", ["--n-len", "0"], "at least 1"),
        ("n-len-text", ["--n-len", "ten"], "invalid int value"),
        ("max-train-len", ["--n-len", "5", "--max-train-len", "9"], "--max-train-len"),
        ("curriculum-format", ["--curriculum", "binary_copy"], "TASK:SHARE"),
        ("curriculum-share", ["--curriculum", "binary_copy:1.5:10"], "the share must be in"),
        ("curriculum-sum", ["--curriculum", "binary_copy:0.6:10,polynomial:0.5:0"], "sum to less than 1"),
        ("curriculum-task", ["--curriculum", "nope:0.5:10"], "unknown task"),
        ("fixed-curriculum", ["--data", "fixed", "--curriculum", "binary_copy:0.5:10"], "need --data online"),
        ("fixed-adaptive", ["--data", "fixed", "--length-sampling", "adaptive"], "need --data online"),
        ("fixed-offsets", ["--data", "fixed", "--position-offsets"], "need --data online"),
        ("init-missing", ["--init-from", "{w}/missing"], "not a directory"),
        ("init-truncated", ["--init-from", "{w}/trunc"], "model.safetensors"),
        ("init-not-checkpoint", ["--init-from", "{w}/empty"], "not a model checkpoint"),
        ("heads-divide", ["--n-embd", "33", "--n-head", "2"], "multiple of n_head"),
        ("layers-zero", ["--n-layer", "0"], "n_layer must be at least 1"),
        ("restart-at", ["--restart-at", "-5"], "--restart-at must be 0 or more"),
        ("restart-below", ["--restart-below", "1.5"], "--restart-below must be between 0 and 1"),
        ("query-init-scale", ["--query-init-scale", "-1"], "--query-init-scale must be 0 or more"),
        ("unknown-flag", ["--learning-rate", "1"], "unrecognized arguments"),
        ("resume-no-run", ["--resume", "--output-dir", "{w}/empty"], "no run_config.json"),
        ("resume-overwrite", ["--resume", "--output-dir", "{w}/stored", "--overwrite"], "give one"),
        ("resume-contradicts", ["--resume", "--output-dir", "{w}/stored", "--lr", "0.5"], "contradicts the run"),
        ("resume-recipe", ["--resume", "--output-dir", "{w}/stored", "--recipe", "paper"], "contradicts the run"),
        ("resume-shorter", ["--resume", "--output-dir", "{w}/stored", "--max-steps", "1"], "contradicts the run"),
        ("resume-config-not-json", ["--resume", "--output-dir", "{w}/stored-badjson"], "run_config.json is not valid JSON"),
        ("resume-config-not-object", ["--resume", "--output-dir", "{w}/stored-array"], "is not a JSON object"),
        ("resume-config-wrong-type", ["--resume", "--output-dir", "{w}/stored-badtype"], 'run_config.json: lr is "fast"'),
        ("resume-config-impossible", ["--resume", "--output-dir", "{w}/stored-badvalue"],
         "run_config.json holds a value no run can use: --batch-size must be at least 1"),
        ("resume-config-infinite", ["--resume", "--output-dir", "{w}/stored-inf"], "--lr must be a finite number"),
        ("lr-inf", ["--lr", "inf"], "--lr must be a finite number, got inf"),
        ("n-len-over-limit", ["--n-len", "10000"], "--n-len 10000 is over the limit of 4096"),
        ("lr-nan", ["--lr", "nan"], "--lr must be"),
        ("betas-inf", ["--betas", "0.9,inf"], "--betas"),
        ("init-range-negative", ["--init-range", "-1"], "--init-range is a standard deviation and must be 0 or more"),
        ("embed-std-inf", ["--embed-init-std", "inf"], "--embed-init-std must be a finite number"),
        ("init-from-is-output", ["--init-from", "{w}/ckpt", "--output-dir", "{w}/ckpt", "--overwrite"], "is the --init-from"),
        ("output-inside-init-from", ["--init-from", "{w}/ckpt", "--output-dir", "{w}/ckpt/transfer"], "inside the --init-from"),
        ("output-holds-init-from", ["--init-from", "{w}/ckpt", "--output-dir", "{w}", "--overwrite"], "holds the --init-from"),
        *([("fp16-on-cpu", ["--mixed-precision", "fp16"], "needs a CUDA GPU")] if not torch.cuda.is_available() else []),
        ("init-from-with-shape", ["--init-from", "{w}/ckpt", "--preset", "tiny", "--n-embd", "32", "--init-range", "0.1"],
         "--n-embd, --init-range shape(s) a new model"),
        ("decay-steps-unused", ["--decay-steps", "100"], "--decay-steps applies to --schedule formed-cosine only"),
        ("restart-below-unused", ["--restart-at", "0", "--restart-below", "0.3"], "--restart-below applies only"),
        ("max-restarts-unused", ["--restart-at", "0", "--max-restarts", "2"], "--max-restarts applies only"),
        ("anchor-below-unused", ["--anchor-below", "0.5"], "--anchor-below applies only with --anchor-at"),
    ]
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=_ids(TRAIN_CASES))
def test_train(case, in_world, capsys):
    check_case(cli_runner(capsys), case[1], case[2], "hf-iterheads train", in_world)


# --- detect ---------------------------------------------------------------------------------------------------

DETECT = ["detect", "polynomial-cot", "--task", "polynomial", "--n", "4", "--lengths", "4", "--output-dir", "{w}/new"]
DETECT_CASES: list[Case] = [
    (name, DETECT + extra, expected) for name, extra, expected in [
        ("unknown-task", ["--task", "fib"], "unknown task"),
        ("out-not-empty", ["--output-dir", "{w}/full"], "not empty"),
        ("out-is-file", ["--output-dir", "{w}/file.txt"], "is a file"),
        ("out-proc", ["--output-dir", "/proc/x"], "cannot write"),
        ("lengths-short", ["--lengths", "1"], "at least 2"),
        ("lengths-text", ["--lengths", "four"], "length"),
        ("n-zero", ["--n", "0"], "at least 1"),
        ("batch-zero", ["--batch-size", "0"], "at least 1"),
        ("shots-negative", ["--shots", "-1"], "--shots must be 0 or more"),
        ("pattern-spec", ["--pattern", "nope"], "expected module:attr"),
        ("pattern-missing", ["--pattern", "json:nope"], "has no attribute"),
        ("capture", ["--capture", "x"], "invalid choice"),
        ("dtype", ["--dtype", "int8"], "invalid choice"),
        ("device", ["--device", "cuda"], "no CUDA device"),
        ("template", ["--template", "{inputs}"], "must contain {inputs} then {states}"),
        ("chat-without-template", ["--chat"], "has no chat template"),
        ("top-k-all-heads", ["--ablate", "--top-k", "5"], "attention head(s) in all"),
        ("top-k-patch", ["--patch", "--top-k", "3"], "attention head(s) in all"),
        ("missing-folder", ["--task", "parity"], "no such folder"),
        ("not-causal", [], "not a causal LM"),
        ("truncated", [], "damaged or incomplete"),
        ("not-on-hub-offline", [], "HF_HUB_OFFLINE"),
        ("out-is-the-model", ["--output-dir", "{w}/ckpt", "--overwrite"], "is the model"),
        ("overwrite-not-detects", ["--output-dir", "{w}/full", "--overwrite"], "not written by hf-iterheads detect"),
    ]
]
_DETECT_MODEL = {"missing-folder": "./nope/x", "not-causal": "{w}/bert", "truncated": "{w}/trunc",
                 "not-on-hub-offline": "acme/missing-model", "out-is-the-model": "{w}/ckpt"}


@pytest.mark.parametrize("case", DETECT_CASES, ids=_ids(DETECT_CASES))
def test_detect(case, in_world, capsys):
    name, argv, expected = case
    argv = [_DETECT_MODEL.get(name, a) if i == 1 else a for i, a in enumerate(argv)]
    check_case(cli_runner(capsys), argv, expected, "hf-iterheads detect", in_world)


# --- a user's own code that fails: one line naming it -------------------------------------------------------------

USER_PATTERNS = """
import torch
from hf_iterheads.detect.patterns import HeadPattern
RAISES = HeadPattern("raises_here", pairs=lambda probes, idx: {}["no key"])
WRONG_SHAPE = HeadPattern("wrong_shape_here", pairs=lambda probes, idx: (torch.zeros(3), torch.zeros(3)))
PAST_END = HeadPattern("past_end_here", pairs=lambda probes, idx: (torch.full((len(idx), 1), 999), torch.zeros(len(idx), 1, dtype=torch.long)))
"""
USER_CODE_CASES: list[Case] = [
    ("pattern-import-raises", DETECT + ["--pattern", "user_pat_boom:X"], "importing 'user_pat_boom' raised RuntimeError: boom"),
    ("pattern-fn-raises", DETECT + ["--pattern", "user_pats:RAISES"], "its function <lambda> raised KeyError"),
    ("pattern-wrong-shape", DETECT + ["--pattern", "user_pats:WRONG_SHAPE"], "must return (queries, keys)"),
    ("pattern-past-end", DETECT + ["--pattern", "user_pats:PAST_END"], "a position past the longest probe"),
    ("scan-binary-models-file", ["scan", "--models-file", "{w}/models.bin", "--output-dir", "{w}/new"], "is not UTF-8 text"),
    ("scan-nul-models-file", ["scan", "--models-file", "{w}/models-nul.txt", "--output-dir", "{w}/new"], "is a binary file"),
]


@pytest.fixture
def user_code(in_world, tmp_path, monkeypatch) -> Path:
    """The user's pattern modules on the import path (outside the world, whose files must not change)."""
    (tmp_path / "user_pats.py").write_text(USER_PATTERNS)
    (tmp_path / "user_pat_boom.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    from hf_iterheads.detect import patterns

    # --pattern registers the user's patterns in this process: the broken ones must not outlive their test
    monkeypatch.setattr(patterns, "_REGISTRY", dict(patterns._REGISTRY))
    for name, data in (("models.bin", b"\xff\xfe\x00\x01"), ("models-nul.txt", b"gpt2\n\x00\x00\n")):
        if not (in_world / name).exists():
            (in_world / name).write_bytes(data)
    return in_world


@pytest.mark.parametrize("case", USER_CODE_CASES, ids=_ids(USER_CODE_CASES))
def test_users_own_code(case, user_code, capsys):
    name, argv, expected = case
    check_case(cli_runner(capsys), argv, expected, f"hf-iterheads {argv[0]}", user_code)


def test_the_python_api_refuses_a_module_that_is_not_a_language_model():
    from hf_iterheads import detect_iteration_heads
    from hf_iterheads.errors import IterHeadsError

    with pytest.raises(IterHeadsError, match="needs a transformers causal LM"):
        detect_iteration_heads(torch.nn.Linear(2, 2), object(), task="parity")
