"""``hf-iterheads scan``: the detector over many models, revisions and tasks, into one atlas folder.

The unit of work is a (model, revision, task) triple. Each finished triple is saved on its own as
``DIR/parts/<key>.json`` (scores.json content plus the report's attention maps, clean accuracy, parameter count),
written atomically, so a second run skips what is done (resume) and a crash loses one triple at most. A triple
that fails (not causal, no attention weights, out of memory, not found offline ...) is saved as a failure with
its reason: never fatal. Then the parts are merged (:mod:`.atlas`): results.parquet, summary.md, figures/,
report.html, and the Hub dataset folder when ``--push-to-hub`` is given.

Models are loaded one at a time (all of a model's tasks run on one load, then it is freed). Under
``accelerate launch`` every process takes a contiguous share of the pending triples (so a model is mostly
loaded once), and the main process merges after all have finished.

The detector is used only through its public API (:class:`.detection.IterationHeadDetector`); its options are
forwarded as keyword arguments, listed once in :data:`FORWARDED` (a new detector option is one line there).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import IterHeadsError
from ..outputs import LOCK_NAME, check_writable, write_json_atomic
from .scan_plan import (  # noqa: F401  (re-exported: scan.model_specs and friends keep working)
    DEFAULT_TASKS,
    FORWARDED,
    PARTS,
    RUN_ONLY,
    _is_local,
    model_specs,
    parse_lengths,
    part_key,
    settings,
    step_of,
    task_list,
)

# --- one model at a time ---------------------------------------------------------------------------------


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(loading, detect) keywords, checked against the detector's signatures: an option it lacks is one clear line."""
    from .detection import IterationHeadDetector

    load_params = set(inspect.signature(IterationHeadDetector.__init__).parameters) - {"self", "model", "tokenizer", "revision"}
    detect_params = set(inspect.signature(IterationHeadDetector.detect).parameters) - {"self", "task", "lengths", "n"}
    unknown = sorted(set(options) - load_params - detect_params)
    if unknown:
        raise IterHeadsError(f"this detector has no option {', '.join('--' + k.replace('_', '-') for k in unknown)}")
    return {k: v for k, v in options.items() if k in load_params}, {k: v for k, v in options.items() if k in detect_params}


def failure_reason(err: BaseException) -> str:
    """One line saying why a triple failed; out-of-memory named as such."""
    import torch

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or "out of memory" in text.lower():
        return f"out of memory: {text}"
    return text if isinstance(err, IterHeadsError) else f"{type(err).__name__}: {text}"


def _cached_commit(model: str, revision: str | None) -> str | None:
    """The commit a Hub revision resolved to, read from the Hub cache the model was just loaded from."""
    if _is_local(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(model, "config.json", revision=revision or "main")
    parts = Path(path).parts if isinstance(path, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _clean_metrics(detector, result, d: dict, task: str, lengths, n: int, detect_kw: dict) -> dict | None:
    """Teacher-forced accuracy of the model on the probes: from the result when it has it, else one more pass."""
    if isinstance(d.get("clean_accuracy"), dict):
        return d["clean_accuracy"]
    if d.get("ablation", {}).get("clean"):
        return d["ablation"]["clean"]
    from .ablation import teacher_forced_metrics

    params = inspect.signature(detector.probes).parameters
    probes = detector.probes(task, lengths, n, **{k: v for k, v in detect_kw.items() if k in params})
    return teacher_forced_metrics(detector.model, probes, int(detect_kw.get("batch_size", 16)))


def scan_model(
    model: str, revision: str | None, tasks: list[str], n: int, lengths: str, options: dict[str, Any], parts: Path, maps: int = 3,
    worker: str = "0/1",
) -> list[str]:
    """Load one model, run its tasks, save one part per task (a failure part where it fails); free it."""
    import torch

    from .detection import IterationHeadDetector
    from .html import head_maps, result_maps

    load_kw, detect_kw = split_options(options)
    base = {"model": model, "revision": revision, "step": step_of(revision), "settings": settings(n, lengths, options),
            "tool_version": __version__, "worker": worker}
    statuses = []
    detector = None
    try:
        detector = IterationHeadDetector(model, revision=revision, **load_kw)
        base["n_params"] = int(sum(p.numel() for p in detector.model.parameters()))
        base["commit"] = getattr(detector.model.config, "_commit_hash", None) or _cached_commit(model, revision)
        base["architecture"] = type(detector.model).__name__
    except Exception as err:  # noqa: BLE001 -- any loading failure is that model's row, never the scan's end
        reason = failure_reason(err)
        for task in tasks:
            _save(parts, {**base, "task": task, "status": "failed", "error": reason})
        return ["failed"] * len(tasks)
    try:
        for task in tasks:
            try:
                result = detector.detect(task, lengths, n, **detect_kw)
                d = result.to_dict()
                d.setdefault("eoi_detected", [[bool(v) for v in row] for row in result.eoi_detected()])
                clean = _clean_metrics(detector, result, d, task, lengths, n, detect_kw)
                try:
                    pictures = head_maps(detector.model, detector.tokenizer, result, maps) if maps else []
                except Exception:  # noqa: BLE001 -- the pictures are extra: keep the best head's map, keep the scores
                    pictures = result_maps(result)
                _save(parts, {**base, "task": task, "status": "ok", "error": None, "clean": clean, "result": d, "maps": pictures})
                statuses.append("ok")
            except Exception as err:  # noqa: BLE001 -- recorded with its reason, the scan goes on
                _save(parts, {**base, "task": task, "status": "failed", "error": failure_reason(err)})
                statuses.append("failed")
    finally:
        del detector
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return statuses


def _save(parts: Path, part: dict) -> None:
    part["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(part, parts / f"{part_key(part['model'], part['revision'], part['task'])}.json")


def load_parts(parts: Path) -> dict[str, dict]:
    """Every saved triple by file key (a half-written file cannot exist: writes are atomic)."""
    out = {}
    for f in sorted(parts.glob("*.json")) if parts.is_dir() else []:
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise IterHeadsError(f"cannot read {f}: {err}; delete it to rescan that triple") from None
    return out


def _shard(items: list, index: int, count: int) -> list:
    """Contiguous share ``index`` of ``count``: a model's tasks mostly stay on one process."""
    lo, hi = len(items) * index // count, len(items) * (index + 1) // count
    return items[lo:hi]


# --- the whole scan --------------------------------------------------------------------------------------


def run_scan(models: list[tuple[str, str | None]], tasks: list[str], output_dir: str | Path, *args, **kwargs) -> dict[str, Any]:
    """:func:`_run_scan` holding the output folder's lock (main process): a second scan of the folder is refused."""
    import contextlib
    import os

    from ..outputs import folder_lock

    check_writable(output_dir)
    if os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        lock = contextlib.nullcontext()
    else:
        lock = folder_lock(output_dir, "--output-dir")
    with lock:
        return _run_scan(models, tasks, output_dir, *args, **kwargs)


def _check_scan_folder(out: Path, n: int, lengths: str, options: dict[str, Any], maps: int) -> None:
    """Every option and the output folder, before any model loads."""
    if n < 1 or int(options.get("batch_size", 1)) < 1 or int(options.get("top_k", 1)) < 1 or maps < 0:
        raise IterHeadsError("--n, --batch-size and --top-k must be at least 1, --maps 0 or more")
    if int(options.get("shots") or 0) < 0:
        raise IterHeadsError(f"--shots must be 0 or more, got {options['shots']}")
    parse_lengths(lengths)
    split_options(options)
    if out.exists() and not out.is_dir():
        raise IterHeadsError(f"--output-dir {out} exists and is not a folder")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) and not (out / PARTS).is_dir():
        raise IterHeadsError(f"--output-dir {out} holds other files; scan into an empty folder or one a scan made")
    check_writable(out)


def _pending(out: Path, triples: list[tuple[str, str | None, str]], wanted: dict, retry_failed: bool) -> list:
    """The triples not yet scanned (or failed, with ``retry_failed``); refuses a folder scanned with other settings."""
    done = load_parts(out / PARTS)
    for key, part in done.items():
        if part.get("settings") != wanted:
            had = part.get("settings") or {}
            diff = sorted(k for k in set(wanted) | set(had) if wanted.get(k) != had.get(k))
            raise IterHeadsError(
                f"{out} was scanned with other settings ({', '.join(diff)} differ, e.g. in {key}.json); "
                "use the same options or another --output-dir"
            )
    return [(m, r, t) for m, r, t in triples
            if (part := done.get(part_key(m, r, t))) is None or (retry_failed and part["status"] == "failed")]


def _merge(out: Path, n: int, lengths: str, options: dict[str, Any], control: bool | None, push_to_hub: str | None,
           dry_run: bool) -> dict[str, Any]:
    """Main process: the organism control where wanted, the atlas from every part, and the upload."""
    from .atlas import write_atlas
    from .atlas_hub import publish
    from .control import CONTROL_FILE, control_wanted, ensure_control

    summary: dict[str, Any] = {}
    parts = load_parts(out / PARTS)
    if control_wanted(list(parts.values()), options, control):
        summary["control"] = ensure_control(out, n, lengths, options)
    else:
        (out / CONTROL_FILE).unlink(missing_ok=True)
    summary.update(write_atlas(out, list(parts.values())))
    if push_to_hub:
        summary["hub"] = publish(out, push_to_hub, dry_run)
    return summary


def _run_scan(
    models: list[tuple[str, str | None]],
    tasks: list[str],
    output_dir: str | Path,
    n: int = 64,
    lengths: str = "4-16",
    options: dict[str, Any] | None = None,
    *,
    maps: int = 3,
    retry_failed: bool = False,
    push_to_hub: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
    control: bool | None = None,
) -> dict[str, Any]:
    """Scan every (model, revision, task) not yet in ``output_dir``, then merge (main process) into the atlas.

    ``control``: run the text organism under the scan's templates and shots (:mod:`.control`); None = when some
    finished triple probed its model through text."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    options = dict(options or {})
    out = Path(output_dir)
    _check_scan_folder(out, n, lengths, options, maps)
    # cpu=True: under a torchrun-style launch on CPUs, processes join a gloo group instead of staying alone
    state = PartialState(cpu=options.get("device") == "cpu" and not options.get("device_map"))
    if options.get("device") == "auto" and state.num_processes > 1:
        options["device"] = str(state.device)
    triples = [(m, r, t) for m, r in models for t in tasks]
    pending = _pending(out, triples, settings(n, lengths, options), retry_failed)
    state.wait_for_everyone()  # every process has listed the same pending work before any writes a part
    groups: dict[tuple[str, str | None], list[str]] = {}
    for m, r, t in _shard(pending, state.process_index, state.num_processes):
        groups.setdefault((m, r), []).append(t)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    desc = "models" if state.num_processes == 1 else f"models (process {state.process_index + 1}/{state.num_processes})"
    bar = tqdm(list(groups.items()), desc=desc, unit="model", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for (m, r), ts in bar:
        bar.set_postfix_str(f"{m}{'@' + r if r else ''}")
        scan_model(m, r, ts, n, lengths, options, out / PARTS, maps, f"{state.process_index}/{state.num_processes}")
    state.wait_for_everyone()
    summary: dict[str, Any] = {"triples": len(triples), "skipped": len(triples) - len(pending), "ran": len(pending),
                               "processes": state.num_processes, "main": state.is_main_process}
    if state.is_main_process:
        summary.update(_merge(out, n, lengths, options, control, push_to_hub, dry_run))
    state.wait_for_everyone()
    return summary


# --- CLI -------------------------------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "scan",
        help="detect iteration heads in many models, revisions and tasks; results.parquet, summary, figures, report.html",
        description="Scan many causal LMs (folders, bundled checkpoints, Hub repo ids) for iteration heads; resumable; "
        "shards over processes under `accelerate launch`.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="model folder, bundled checkpoint, Hub repo id, or ID@REV[,REV...]")
    p.add_argument("--models-file", default=None, help="a file with one MODEL (or ID@REV,...) per line; # starts a comment")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated tasks: names or import strings module:attr "
                   f"(default {DEFAULT_TASKS})")
    p.add_argument("--revisions", default=None, help="Hub revisions for every Hub model without its own, e.g. main,step1000")
    p.add_argument("--n", type=int, default=64, help="probes per task (default 64)")
    p.add_argument("--lengths", default="4-16", help="chain lengths, e.g. 4-16 (default)")
    for flag, kwargs in FORWARDED:
        p.add_argument(flag, **kwargs)
    p.add_argument("--maps", type=int, default=3, help="top heads whose attention map goes in report.html (default 3)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                   help="run the bundled text organism (positive control) under the same templates and shots and flag "
                   "every template under which its head is not found (default: when the scan probes some model as text)")
    p.add_argument("--retry-failed", action="store_true", help="rerun the triples that failed before (finished ones are skipped)")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="publish the atlas as a Hub dataset (with a card)")
    p.add_argument("--dry-run", action="store_true", help="with --push-to-hub: write the dataset folder DIR/hub, upload nothing")
    p.add_argument("--output-dir", required=True, help="the atlas folder (created; an existing scan folder is resumed)")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    tasks = task_list(args.tasks)  # fail before loading anything
    parse_lengths(args.lengths)
    if args.dry_run and not args.push_to_hub:
        raise IterHeadsError("--dry-run goes with --push-to-hub ORG/NAME")
    if args.push_to_hub and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.push_to_hub):
        raise IterHeadsError(f"--push-to-hub {args.push_to_hub!r}: write ORG/NAME")
    models = model_specs(args.models, args.models_file, args.revisions)
    options = {dest: getattr(args, dest) for dest in (flag.lstrip("-").replace("-", "_") for flag, _ in FORWARDED)}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # a failing model is a row, not a page of warnings
    import datasets

    datasets.disable_progress_bars()
    s = run_scan(models, tasks, args.output_dir, args.n, args.lengths, options, maps=args.maps, retry_failed=args.retry_failed,
                 push_to_hub=args.push_to_hub, dry_run=args.dry_run, control=args.control)
    if s["main"]:
        out = Path(args.output_dir)
        print(f"scanned {s['ran']} of {s['triples']} (model, revision, task) triples ({s['skipped']} already done) "
              f"on {s['processes']} process(es); {s['failed']} failed in the atlas")
        print((out / "summary.md").read_text().split("\n## ", 1)[0].strip())
        from .control import flags

        for flag in flags(s.get("control")):
            print(f"FLAG {flag}")
        for note in s.get("notes", []):
            print(note, file=sys.stderr)
        print(f"wrote {out / 'results.parquet'}, {out / 'summary.md'}, {out / 'report.html'}")
        if s.get("hub"):
            print(s["hub"])
    return 0
