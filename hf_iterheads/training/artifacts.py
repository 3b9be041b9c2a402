"""What a run leaves on disk: the metrics log, ``save_state`` checkpoints, and the final checkpoint with its card.

Output directory: ``metrics.jsonl`` (train and eval records, one JSON per line), ``run_config.json``,
``checkpoints/step_N`` (``save_state``), ``logs/`` (tensorboard), ``eval_results.json``, and at the end a
checkpoint loadable by ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained(DIR)`` with a model card.
Every file is written whole or not at all (temporary names, then a rename).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import types
import typing
from pathlib import Path

from ..errors import IterHeadsError
from ..outputs import LOCK_NAME, check_not_in_use, check_not_input, check_writable, folder_lock, read_jsonl, remove_atomically
from .config import TrainConfig

DATASET_REPO_ID = "hf-iterheads/iterative-tasks"  # where the datasets are published (model card metadata)


def prepare_output_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, a run directory that cannot be written, holds something else, overlaps
    ``--init-from``, or is in use by another process; with ``overwrite``, swap the old run out (a rename, then
    the delete): it is never half deleted."""
    out = Path(cfg.output_dir)
    init = None if cfg.init_from is None else _local_init(cfg.init_from)
    if init is not None:
        check_not_input(out, {"--init-from": init}, "--output-dir")
    if resume:
        return
    if out.exists() and not out.is_dir():
        raise IterHeadsError(f"--output-dir {out} is a file, not a directory")
    check_writable(out, "dir", "--output-dir")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not overwrite:
            raise IterHeadsError(f"{out} exists and is not empty; pass --resume to continue or --overwrite to replace it")
        if not (out / "run_config.json").is_file():
            raise IterHeadsError(f"refusing to --overwrite {out}: it does not look like a training run directory")
        with folder_lock(out, "--output-dir"):  # refused while another process trains there
            pass
        remove_atomically(out)
    else:
        check_not_in_use(out, "--output-dir")


def check_values(cfg: TrainConfig) -> None:
    """Values ``config.check_config`` lets through but no run can use: a non-finite number (``--lr inf`` trains an
    all-NaN model) and a negative init std. Before any work, the flag named."""
    from .config import flag_name

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for x in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(x, float) and not math.isfinite(x):
                raise IterHeadsError(f"{flag_name(f.name)} must be a finite number, got {shown_number(value)}")
    from ..data import MAX_N_LEN

    if isinstance(cfg.n_len, int) and cfg.n_len > MAX_N_LEN:
        raise IterHeadsError(f"--n-len {cfg.n_len} is over the limit of {MAX_N_LEN} (the longest sequence length a "
                             "dataset may have; the paper's is 16)")
    for name in ("init_range", "embed_init_std"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise IterHeadsError(f"{flag_name(name)} is a standard deviation and must be 0 or more, got {getattr(cfg, name)}")


# What shapes and initialises a new model: --init-from loads one instead. (--preset is not here: a sweep or the
# reproduction passes its preset to every run, transfers included, and a preset names the family, not a change.)
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "n_inner", "init_range", "embed_init_std", "query_init_scale",
               "freeze_positions")


def check_flags_used(cfg: TrainConfig, given: set[str]) -> None:
    """Refuse a flag the run would record in ``run_config.json`` but never use, saying why: a user who gives it
    expects it to change something."""
    from .config import flag_name

    if cfg.init_from:
        shaped = [flag_name(n) for n in MODEL_FLAGS if n in given]
        if shaped:
            raise IterHeadsError(f"{', '.join(shaped)} shape(s) a new model, but --init-from {cfg.init_from} trains the "
                                 "checkpoint's model as it is; drop the flag(s) or --init-from")
    if "decay_steps" in given and cfg.schedule != "formed-cosine":
        raise IterHeadsError(f"--decay-steps applies to --schedule formed-cosine only (this run's schedule is {cfg.schedule})")
    if cfg.restart_at == 0 and "restart_below" in given:
        raise IterHeadsError("--restart-below applies only with --restart-at > 0 (the plateau check is off)")
    if cfg.restart_at == 0 and cfg.anchor_at == 0 and "max_restarts" in given:
        raise IterHeadsError("--max-restarts applies only when the run may restart: --restart-at and --anchor-at are 0 (never)")
    if cfg.anchor_at == 0 and "anchor_below" in given:
        raise IterHeadsError("--anchor-below applies only with --anchor-at > 0 (the anchor check is off)")


def shown_number(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _type_ok(value, hint) -> bool:
    """Whether a JSON value fits a TrainConfig field's annotation (int, float, str, bool, list/tuple/dict, Literal, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return isinstance(value, list) and all(any(_type_ok(v, a) for a in inner) for v in value) if inner else isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def load_run_config(path: Path) -> TrainConfig:
    """``run_config.json`` read back and checked like the flags were: a hand edit (bad JSON, a value of the wrong
    type, an impossible value) is one error naming the file and the key, not a traceback nor a flag never given."""
    from .config import check_config

    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise IterHeadsError(f"{path} is not valid JSON ({err}); it is the stored run's settings") from None
    if not isinstance(raw, dict):
        raise IterHeadsError(f"{path} is not a JSON object of run settings")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in raw and not _type_ok(raw[f.name], hints[f.name]):
            raise IterHeadsError(f"{path}: {f.name} is {json.dumps(raw[f.name])}, which is not a valid {f.name} "
                                 f"({getattr(hints[f.name], '__name__', hints[f.name])}); fix the file or start a new run")
    try:
        cfg = TrainConfig.load(path)
        check_config(cfg)
        check_values(cfg)
    except IterHeadsError as err:
        raise IterHeadsError(f"{path} holds a value no run can use: {err}") from None
    except (TypeError, ValueError, KeyError) as err:
        raise IterHeadsError(f"{path} holds a value no run can use ({type(err).__name__}: {err})") from None
    return cfg


def _local_init(init_from: str) -> Path | None:
    """The local folder ``--init-from`` reads (a path, or a bundled checkpoint's folder); None for a Hub id."""
    path = Path(init_from).expanduser()
    if path.exists():
        return path
    from ..bundled import bundled_path

    return bundled_path(init_from)


def start_run(run, resume: bool) -> None:
    """The run directory, ``run_config.json``, the metrics log (cut back to the checkpoint on resume), trackers."""
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        for stale in [*run.out.glob(".final-*"), *run.out.glob("checkpoints/.tmp_step_*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
        run.cfg.save(run.out / "run_config.json")
    # A resumed run keeps the records up to its checkpoint; with no checkpoint yet it starts over.
    run.log = MetricsLog(run.out / "metrics.jsonl", (run.step if run.step > 0 else -1) if resume else None, run.main)
    if run.accelerator.log_with:
        hparams = {k: v for k, v in dataclasses.asdict(run.cfg).items() if isinstance(v, (int, float, str, bool))}
        run.accelerator.init_trackers("iterheads", config=hparams)


def archive_attempt(out: Path, attempt: int) -> None:
    """Move a restarted attempt's metrics and checkpoints to ``attempts/N/``: the next attempt starts clean, and
    the record of what failed (and the time it cost) stays."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        dest = out / "attempts" / str(attempt)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "checkpoints"):
            if (out / name).exists():
                os.replace(out / name, dest / name)
    state.wait_for_everyone()


def restore_checkpoint(run) -> None:
    """Load the latest ``save_state`` checkpoint (model, optimizer, scheduler, RNGs, adaptive lengths), if any."""
    ckpt = latest_checkpoint(run.out)
    if ckpt is not None:
        run.accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        run.step, run.elapsed = state["step"], state["elapsed"]


def save_run(run, tokenizer, final: list[dict], seconds: float) -> None:
    """``eval_results.json``, then the final checkpoint with its model card (main process)."""
    from ..outputs import write_json_atomic

    write_json_atomic({"step": run.step, "seconds": round(seconds, 1), "results": final}, run.out / "eval_results.json")
    model = run.accelerator.unwrap_model(run.model)
    save_final(model, tokenizer, run.out, render_model_card(run.cfg, model, final, run.step, seconds))


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = [p for p in (output_dir / "checkpoints").glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return max(ckpts, key=lambda p: int(p.name[5:]), default=None)


def save_checkpoint(accelerator, out: Path, step: int, elapsed: float, keep: int) -> None:
    """``save_state`` into ``checkpoints/step_N`` (written under a temporary name, then renamed)."""
    final = out / "checkpoints" / f"step_{step}"
    tmp = out / "checkpoints" / f".tmp_step_{step}"
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "elapsed": elapsed}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpts = sorted((p for p in final.parent.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        for old in ckpts[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


class MetricsLog:
    """Append-only JSONL of every record (``metrics.jsonl``), one per (kind, step, task).

    On resume, records after the checkpoint go (and a line torn by a kill); the final evaluation replaces the
    periodic one of the same step.
    """

    def __init__(self, path: Path, resume_step: int | None, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            self._rewrite([r for r in read_jsonl(path, torn_tail_ok=True) if r.get("step", 0) <= resume_step])

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def drop(self, kind: str, step: int) -> None:
        """Remove the records of ``kind`` at ``step`` (before writing the ones that supersede them)."""
        if self.enabled and self.path.is_file():
            self._rewrite([r for r in read_jsonl(self.path) if (r.get("kind"), r.get("step")) != (kind, step)])


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a run's ``metrics.jsonl``; a damaged line is one clear error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise IterHeadsError(f"{path} does not exist (no training metrics there)")
    records = read_jsonl(path)
    for number, record in enumerate(records, 1):
        if not isinstance(record.get("step"), int):
            raise IterHeadsError(f"{path}: record {number} has no integer step; not a training metrics record")
    return records


# --- final checkpoint and model card -----------------------------------------------------------------------


def render_model_card(cfg: TrainConfig, model, final_eval: list[dict], steps: int, seconds: float) -> str:
    """README.md of the checkpoint from the packaged ``templates/model_card_template.md``, measured results in
    model-index."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from ..modeling import count_parameters, iterheads_meta

    results = []
    for r in final_eval:
        lo, hi = r["summary_lengths"][0], r["summary_lengths"][-1]
        for key, label in (("accuracy", "test sequence accuracy"), ("generation_accuracy", "greedy generation accuracy"),
                           ("attn1_peakiness", "attn1 (iteration head) peakiness")):
            if r["summary"].get(key) is not None:
                results.append(EvalResult(
                    task_type="text-generation", dataset_type=DATASET_REPO_ID, dataset_name=f"iterative tasks: {r['task']}",
                    dataset_config=r["task"], dataset_split="test", metric_type=key,
                    metric_name=f"{label} (mean L={lo}..{hi})", metric_value=round(float(r["summary"][key]), 4),
                ))
    name = f"iterheads-{'-'.join(cfg.tasks)}-{'cot' if cfg.cot else 'nocot'}-{model.config.n_layer}L"
    data = ModelCardData(
        model_name=name, license="mit", library_name="transformers", pipeline_tag="text-generation",
        datasets=[DATASET_REPO_ID], tags=["iteration-head", "chain-of-thought", "mechanistic-interpretability", "hf-iterheads"],
        eval_results=results or None,
    )
    c = model.config
    return str(ModelCard.from_template(
        data, template_path=str(model_card_template()), model_name=name, tasks=cfg.tasks, cot=cfg.cot, n_len=cfg.n_len,
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_inner=c.n_inner, n_positions=c.n_positions,
        n_params=count_parameters(model), frozen_positions=bool(iterheads_meta(c).get("freeze_positions")),
        recipe=cfg.recipe, cfg=dataclasses.asdict(cfg), steps=steps, minutes=round(seconds / 60, 1), results=final_eval,
        dataset_repo=DATASET_REPO_ID, task_sources=cfg.task_sources,
    ))


def model_card_template() -> Path:
    """The card template shipped in the package (the only copy: ``model_cards/`` holds the per-checkpoint notes)."""
    from importlib.resources import files

    path = Path(str(files("hf_iterheads") / "templates" / "model_card_template.md"))
    if path.is_file():
        return path
    raise IterHeadsError("the model card template is missing from the installation (templates/model_card_template.md)")


def save_final(model, tokenizer, output_dir: Path, card: str) -> None:
    """save_pretrained + tokenizer + README into a temp dir, then renamed in, ``config.json`` last: a
    directory with a config.json always holds the complete checkpoint."""
    from ..tokenizer import save_tokenizer

    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=".final-"))
    try:
        model.save_pretrained(str(tmp))
        save_tokenizer(tokenizer, tmp)
        (tmp / "README.md").write_text(card)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
            f.chmod(0o644)
            os.replace(f, output_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


