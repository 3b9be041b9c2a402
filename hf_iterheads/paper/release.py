"""Publish a checkpoint the Hugging Face way: ``hf-iterheads release --repo-id ORG/NAME``.

The folder that goes up is assembled first (safetensors weights, config, tokenizer, model card) and checked
to load with plain ``AutoModelForCausalLM`` / ``AutoTokenizer``; ``--dry-run`` writes exactly that folder
(plus the hidden marker ``.hf-iterheads-output.json`` by which a later ``--overwrite`` knows it may replace
it) and uploads nothing. Pickled weights (``*.bin``, ``*.pt``) are never published.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# torch-free (bundled.py): `release --help` lists the bundled checkpoints at once
from ..bundled import BUNDLED as BUNDLED
from ..bundled import bundled_checkpoints, bundled_path
from ..errors import IterHeadsError, hub_errors, require_hub
from ..outputs import atomic_output_dir, check_output_dir

RELEASE_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
)
PICKLED = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
NOTES_PREFIX = "<!-- hf-iterheads: release notes"
NOTES_MARK = NOTES_PREFIX + ", generated from model_cards/{name}.md -->"
GENERIC_NOTES = "## Intended use and limitations"  # the training card's generic closing section


def release_card(checkpoint: str | Path, notes: str | Path, name: str | None = None) -> str:
    """The checkpoint's training card with its closing section replaced by ``notes`` (a jinja template from
    ``model_cards/``) rendered with numbers measured now: the detector and ablation on the checkpoint's task."""
    import json

    import jinja2

    from ..detect.detection import detect_iteration_heads

    src = resolve_checkpoint(str(checkpoint))
    name = name or Path(notes).stem
    config = json.loads((src / "config.json").read_text())
    if config.get("iterheads", {}).get("text_organism"):
        base = organism_card_head(src, name, config)
    else:
        card = (src / "README.md").read_text()
        base = card.split(NOTES_PREFIX)[0].split(GENERIC_NOTES)[0].rstrip()
    task = (config.get("iterheads", {}).get("tasks") or ["parity"])[-1]  # a transfer model: its last task
    result = detect_iteration_heads(str(src), task=task, ablate=True, full_n=True)  # the card's numbers: all 64 probes
    d, ab = result.to_dict(), result.ablation
    top, eoi = d["top_heads"][0], d["eoi_top_heads"][0]
    evals = json.loads((src / "eval_results.json").read_text())["results"][0] if (src / "eval_results.json").is_file() else {}
    values = dict(
        n=d["n"], lengths=d["lengths_spec"], top=top, eoi=eoi, task=task,
        eoi_peakiness=d["eoi_peakiness"][eoi["layer"]][eoi["head"]],
        all_score=d["iteration_all_score"][top["layer"]][top["head"]], informative=d["informative_share"],
        clean=ab["clean"]["token_accuracy"], ablated=ab["zero"]["top"]["token_accuracy"],
        chance=ab["clean"]["chance_token_accuracy"],
        per_length={int(L): m["accuracy"] for L, m in evals.get("per_length", {}).items()},
        evals=json.loads((src / "text_eval.json").read_text()) if (src / "text_eval.json").is_file() else {},
        recipe=config.get("iterheads", {}), config=config,
    )
    values["min_long"] = min((a for L, a in values["per_length"].items() if L >= 7), default=float("nan"))
    body = jinja2.Template(Path(notes).read_text(), undefined=jinja2.StrictUndefined).render(**values)
    return f"{base}\n\n{NOTES_MARK.format(name=name)}\n\n{body.strip()}\n"


def organism_card_head(src: Path, name: str, c: dict) -> str:
    """A text organism's card head, written from its own files: the model-index from ``text_eval.json`` (the
    verdict per rendering) and the training line from its config ``c`` and ``train_log.jsonl``."""
    import json

    import numpy as np
    from huggingface_hub import EvalResult, ModelCardData

    from ..detect.probes import DEFAULT_TEMPLATE
    from ..detect.prompts import render
    from ..tasks import get_task

    meta, ev = c["iterheads"], json.loads((src / "text_eval.json").read_text())
    task = get_task(ev["task"])
    dataset = f"{ev['task']} rendered as text (hf-iterheads detector probes, lengths {ev['lengths']}, {ev['n']} probes)"

    def result(metric: str, value: float, label: str) -> EvalResult:
        return EvalResult(task_type="text-generation", dataset_type="hf-iterheads/text-probes", dataset_name=dataset,
                          metric_type=metric, metric_value=round(float(value), 4), metric_name=label)

    results = [m for r in ev["renderings"] for m in (
        result("iteration_score", r["score"], f"iteration score of L{r['layer']}H{r['head']}, {r['rendering']}"),
        result("token_accuracy", r["clean_accuracy"], f"teacher-forced token accuracy on the probes, {r['rendering']}"))]
    data = ModelCardData(library_name="transformers", license="mit", pipeline_tag="text-generation", model_name=f"iterheads-{name}",
                         tags=["iteration-head", "chain-of-thought", "mechanistic-interpretability", "hf-iterheads", "model-organism"],
                         eval_results=results)
    log = [json.loads(line) for line in (src / "train_log.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in log if r.get("kind") == "train"][-1]
    example = render(DEFAULT_TEMPLATE, [3, 7, 2], task.run(np.array([[3, 7, 2]]))[0].tolist())[0]
    return "\n".join([
        f"---\n{data.to_yaml()}\n---", "",
        f"# {name}: a GPT-2 with an iteration head, read through the GPT-2 tokenizer", "",
        f"A {c['n_layer']}-layer, {c['n_head']}-head GPT-2 ({c['n_embd']} wide, {c['vocab_size']:,}-token GPT-2 vocabulary, "
        f"{'tied' if c.get('tie_word_embeddings', True) else 'untied'} embeddings) trained with hf-iterheads on {task.description}, "
        f"written as text with its chain of thought: `{example}`. Load it like any Hub model:", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "from hf_iterheads.modeling import bundled_path",
        f'model = AutoModelForCausalLM.from_pretrained(bundled_path("{name}"))',
        f'tokenizer = AutoTokenizer.from_pretrained(bundled_path("{name}"))', "```", "",
        f"Training: {meta['max_steps']} steps in the run that wrote these weights, final training loss {last['loss']:.3f} "
        "(`train_log.jsonl`).",
    ])


def resolve_checkpoint(name: str) -> Path:
    """A checkpoint folder from a path or a bundled short name (e.g. ``polynomial-cot``)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if bundled_path(name):
        return bundled_path(name)
    known = ", ".join(bundled_checkpoints()) or "none"
    if path.exists():
        raise IterHeadsError(f"{name!r} is a file; expected a checkpoint folder or a bundled name (bundled: {known})")
    raise IterHeadsError(f"{name!r} is neither a checkpoint folder nor a bundled checkpoint (bundled: {known})")


def assemble_release(checkpoint: str | Path, dest: Path) -> list[str]:
    """Copy the publishable files of ``checkpoint`` into ``dest`` after checking they are complete and safe."""
    src = resolve_checkpoint(str(checkpoint))
    pickled = [p.name for pattern in PICKLED for p in src.glob(pattern)]
    if pickled:
        raise IterHeadsError(f"{src} holds pickled weights ({', '.join(pickled)}); only safetensors are released")
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer_config.json", "README.md") if not (src / f).is_file()]
    if missing:
        raise IterHeadsError(f"{src} is not a releasable checkpoint: missing {', '.join(missing)}")
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..modeling import is_load_error, load_error_message, weights_damaged

    try:  # exactly what a user of the released repo will run
        AutoModelForCausalLM.from_pretrained(str(src))
        AutoTokenizer.from_pretrained(str(src))
    except Exception as err:  # noqa: BLE001 - safetensors, json and transformers raise many types; one line
        if weights_damaged(err):
            raise IterHeadsError(load_error_message(src, err)) from None
        if not is_load_error(err):
            raise
        raise IterHeadsError(f"{src} does not load with plain transformers: {str(err).strip().splitlines()[0]}") from None
    try:
        card = ModelCard.load(src / "README.md")
    except (OSError, ValueError) as err:
        raise IterHeadsError(f"{src}/README.md is not a readable model card: {str(err).strip().splitlines()[0]}") from None
    if not card.data.to_dict().get("library_name"):
        raise IterHeadsError(f"{src}/README.md is not a model card with metadata (library_name is missing)")
    copied = []
    for name in RELEASE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
            copied.append(name)
    for png in sorted(src.glob("*.png")):  # figures the card may show
        shutil.copy2(png, dest / png.name)
        copied.append(png.name)
    return copied


def release(
    checkpoint: str | Path,
    repo_id: str,
    dry_run: bool = False,
    output_dir: str | Path | None = None,
    private: bool = False,
    token: str | None = None,
    overwrite: bool = False,
) -> str:
    """Upload ``checkpoint`` to ``repo_id``; with ``dry_run`` only write the folder to ``output_dir``."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise IterHeadsError(f"--repo-id expects ORG/NAME, got {repo_id!r}")
    src = resolve_checkpoint(str(checkpoint))  # a wrong name is said before the Hub is asked
    if dry_run:
        if output_dir is None:
            raise IterHeadsError("--dry-run needs --output-dir (the folder that would be uploaded is written there)")
        # --overwrite replaces only an earlier dry run's folder (its marker), never the checkpoint or a folder around it
        guard = dict(command="release", inputs={"--checkpoint": src})
        check_output_dir(output_dir, overwrite, "--output-dir", **guard)
        with atomic_output_dir(output_dir, overwrite, **guard) as tmp:
            files = assemble_release(checkpoint, tmp)
        return f"dry run: wrote {len(files)} files to {output_dir} (nothing uploaded)"
    if output_dir is not None or overwrite:
        raise IterHeadsError("--output-dir and --overwrite only apply with --dry-run (an upload writes no local folder)")
    import tempfile

    hint = "to check the release folder without the Hub, use --dry-run --output-dir DIR"
    require_hub(f"release to {repo_id}", token, hint)  # no network, offline mode, no token: said before any work
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        assemble_release(checkpoint, Path(tmp))
        with hub_errors(f"upload to {repo_id}", hint):
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message="Release hf-iterheads checkpoint")
    return f"uploaded to {getattr(info, 'commit_url', repo_id)}"


def run(args: argparse.Namespace) -> int:
    print(
        release(
            args.checkpoint,
            args.repo_id,
            dry_run=args.dry_run,
            output_dir=args.output_dir,
            private=args.private,
            overwrite=args.overwrite,
        )
    )
    return 0


def add_cli(subparsers) -> None:
    bundled = ", ".join(bundled_checkpoints()) or "none yet"
    parser = subparsers.add_parser(
        "release",
        help="upload a checkpoint (weights, tokenizer, model card) to the Hub",
        description="Publish a trained checkpoint as a Hub model repo; --dry-run writes the exact folder instead.",
    )
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the Hub model repo to create or update")
    parser.add_argument(
        "--checkpoint", default="polynomial-cot", help=f"checkpoint folder or bundled short name (bundled: {bundled})"
    )
    parser.add_argument("--dry-run", action="store_true", help="write the folder that would be uploaded; upload nothing")
    parser.add_argument("--output-dir", default=None, help="where --dry-run writes the folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --output-dir that an earlier `release --dry-run` wrote (never anything else)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.set_defaults(func=run)
