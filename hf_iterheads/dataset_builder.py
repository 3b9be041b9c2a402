"""Write the tasks as a Hub-ready dataset folder (Parquet per config + dataset card), and publish it.

Folder layout, the one ``DatasetDict.push_to_hub(config_name=...)`` produces::

    README.md                       dataset card, `configs:` and `dataset_info:` YAML
    {task}/train-00000-of-00001.parquet
    {task}/test-00000-of-00001.parquet

``load_dataset(folder, "parity")`` reads it offline; ``--push-to-hub ORG/NAME`` uploads exactly this folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .cli import non_negative_int, positive_int
from .data import N_LEN, PER_LENGTH, build_dataset, check_sizes, split_sizes
from .errors import IterHeadsError, hub_errors, require_hub
from .outputs import LOCK_NAME, OUTPUT_MARKER, atomic_output_dir, check_output_dir, fingerprint_configs
from .tasks import IterativeTask, get_task, get_tasks, task_names

if TYPE_CHECKING:  # datasets and huggingface_hub load when a folder is built, not for `--help` or a bad flag
    from datasets import DatasetDict
    from huggingface_hub import DatasetCard

SPLITS = ("train", "test")
PAPER = "https://arxiv.org/abs/2406.02128"


def _reduced_lengths(task: IterativeTask, n_len: int, per_length: int) -> list[str]:
    rows = []
    for length in range(1, n_len + 1):
        n_train, n_test = split_sizes(task, length, per_length)
        if n_test < per_length:
            rows.append(f"L={length}: {n_train}/{n_test}")
    return rows


CARD_BODY = """
# Iterative tasks for iteration heads

Synthetic iterative tasks from ["Iteration Head: A Mechanistic Study of Chain-of-Thought"]({paper})
(Cabannes et al., NeurIPS 2024), plus tasks the paper lacks, built by the hf-iterheads toolkit
(`dataset_scripts/build_datasets.py`, seed {seed}, lengths 1..{n_len}, {per_length} train + {per_length} test sequences per length).

An iterative algorithm keeps a state and folds the inputs into it: `s_t = F(s_(t-1), x_t)`. With
chain-of-thought (CoT) a model writes every state `s_1 .. s_L`; the `text` column holds that sequence
in the project tokenizer's vocabulary:

    <task> x_1 .. x_L <eoi> s_1 .. s_L <eos>

## Tasks (one config each)

| config | rule | train | test |
|---|---|---|---|
{task_rows}

**First step.** Every task starts its chain with `s_1 = x_1` and applies `F` from `t = 2`, as the
paper's reference code does. For binary copy, parity and cumulative sums this equals starting from
`s_0 = 0`; for polynomial iteration it is a special first step (with `s_0 = 0` every chain would start at 1).

## Columns
- `task` (string), `length` (L), `inputs` (`x_1..x_L`), `states` (`s_1..s_L`), `answer` (`s_L`),
  `text` (the CoT sequence, space-separated tokens).

## Splits
For every length L = 1..{n_len} the same count is drawn (lengths are not sampled), uniformly at random.
**Train and test never share an input sequence** (the paper's reference code lets them overlap for short
lengths). Where a length has fewer than {twice} distinct input sequences, every distinct sequence
is used exactly once and split in two halves (train gets the larger half). Lengths with fewer than
{per_length} sequences per split (train/test):

{reduced}

## Use
```python
from datasets import load_dataset
ds = load_dataset("{load_id}", "{default}")
```
"""


def dataset_card(
    datasets: dict[str, DatasetDict], n_len: int, per_length: int, seed: int, repo_id: str | None = None,
    folder: Path | None = None,
) -> DatasetCard:
    """The dataset card: YAML built with ``DatasetCardData``, prose that documents every task and split.

    With ``folder`` (the written Parquet files), each config names the sha256 of its files: two folders with
    different rows never share an entry of the ``datasets`` cache (:func:`outputs.fingerprint_configs`)."""
    from datasets.info import DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from huggingface_hub import DatasetCard, DatasetCardData

    default = "polynomial" if "polynomial" in datasets else next(iter(datasets))
    configs = [
        {
            "config_name": name,
            "data_files": [{"split": s, "path": f"{name}/{s}-*"} for s in SPLITS],
            **({"default": True} if name == default else {}),
        }
        for name in datasets
    ]
    if folder is not None:
        configs = fingerprint_configs(folder, configs)
    total = sum(d[s].num_rows for d in datasets.values() for s in SPLITS)
    size = "10K<n<100K" if total < 100_000 else ("100K<n<1M" if total < 1_000_000 else "1M<n<10M")
    data = DatasetCardData(
        pretty_name="Iterative tasks for iteration heads",
        license="mit",
        language="en",
        task_categories=["text-generation"],
        size_categories=size,
        tags=["chain-of-thought", "interpretability", "iteration-head", "synthetic", "mechanistic-interpretability"],
        configs=configs,
    )
    infos = {}
    for name, dsd in datasets.items():
        info = dsd["train"].info.copy()
        info.splits = SplitDict(
            {s: SplitInfo(name=s, num_bytes=dsd[s].data.nbytes, num_examples=dsd[s].num_rows) for s in SPLITS}
        )
        infos[name] = info
    DatasetInfosDict(infos).to_dataset_card_data(data)

    task_rows = "\n".join(
        f"| `{name}` | {get_task(name).description} | {dsd['train'].num_rows} | {dsd['test'].num_rows} |"
        for name, dsd in datasets.items()
    )
    reduced = "\n".join(
        f"- `{name}`: " + ", ".join(r) for name in datasets if (r := _reduced_lengths(get_task(name), n_len, per_length))
    ) or "- none: every length has enough distinct inputs."
    load_id = repo_id or "ORG/NAME"
    body = CARD_BODY.format(paper=PAPER, seed=seed, n_len=n_len, per_length=per_length, task_rows=task_rows,
                            twice=2 * per_length, reduced=reduced, load_id=load_id, default=default)
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}")


def is_dataset_folder(folder: Path) -> bool:
    """The layout ``build-datasets`` writes (a card and one folder of Parquet files per config, nothing else):
    a folder built before the marker file existed may be replaced too."""
    entries = [p for p in folder.iterdir() if p.name not in (OUTPUT_MARKER, LOCK_NAME)]
    subdirs = [p for p in entries if p.is_dir()]
    return ((folder / "README.md").is_file() and bool(subdirs) and len(entries) == len(subdirs) + 1
            and all(f.is_file() and f.suffix == ".parquet" for d in subdirs for f in d.iterdir()))


GUARD = dict(command="build-datasets", layout=is_dataset_folder)  # what --overwrite may replace


def write_dataset_folder(
    output_dir: str | Path,
    tasks: list[str] | None = None,
    n_len: int = N_LEN,
    per_length: int = PER_LENGTH,
    seed: int = 0,
    overwrite: bool = False,
    repo_id: str | None = None,
) -> Path:
    """Build every task's ``DatasetDict`` and write the Hub folder atomically; returns the folder."""
    task_objs = get_tasks(tasks or task_names())
    check_unique_tasks([t.name for t in task_objs])
    check_sizes(n_len, per_length, len(task_objs))
    if int(seed) < 0:
        raise IterHeadsError(f"the seed must be >= 0, got {seed}")
    check_output_dir(output_dir, overwrite, "--output-dir", **GUARD)
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from tqdm.auto import tqdm

    from .tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # one bar over tasks, not one per Parquet file
    try:
        with atomic_output_dir(output_dir, overwrite, **GUARD) as tmp:
            built = {}
            for task in tqdm(task_objs, desc="building datasets", unit="task"):
                dsd = build_dataset(task, n_len=n_len, per_length=per_length, seed=seed, tokenizer=tokenizer)
                (tmp / task.name).mkdir()
                for split in SPLITS:
                    dsd[split].to_parquet(str(tmp / task.name / f"{split}-00000-of-00001.parquet"))
                built[task.name] = dsd
            dataset_card(built, n_len, per_length, seed, repo_id, folder=tmp).save(tmp / "README.md")
    finally:
        if not quiet:
            enable_progress_bars()
    return Path(output_dir)


def check_unique_tasks(names: list[str]) -> None:
    """Refuse a task listed twice: it would be built (or trained, or scored) twice under one name."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise IterHeadsError(f"--tasks lists {', '.join(twice)} more than once")


def push_dataset_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload the folder as it is (the same bytes a local user loads) to a Hub dataset repo."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with hub_errors(f"upload {folder} to {repo_id}", "the folder is complete: upload it again later"):
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="dataset", commit_message="Upload iterative tasks",
            ignore_patterns=[OUTPUT_MARKER, LOCK_NAME],
        )
    return str(getattr(info, "commit_url", repo_id))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True, help="folder to write (Parquet per task + README.md card)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help=f"tasks to build: names or import strings module:attr (default: all: {' '.join(task_names())})")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--n-len", type=positive_int, default=N_LEN, help="longest length; lengths 1..N (default 16, the paper)")
    parser.add_argument("--per-length", type=positive_int, default=PER_LENGTH,
                        help="train and test sequences per length (default 1024)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output directory that build-datasets wrote (never any other folder)")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None, help="also upload the folder to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads Arrow may use to encode and write Parquet (default: one per core)")


def run(args: argparse.Namespace) -> int:
    """Check everything (tasks, sizes, output folder, Hub access), then build, write and optionally upload."""
    repo = args.push_to_hub
    if repo is not None and (repo.count("/") != 1 or not all(repo.split("/"))):
        raise IterHeadsError(f"--push-to-hub expects ORG/NAME, got {repo!r}")
    if args.private and not repo:
        raise IterHeadsError("--private only applies with --push-to-hub")
    tasks = [t for arg in args.tasks or [] for t in arg.split(",") if t] or None
    if args.tasks is not None and not tasks:
        raise IterHeadsError("--tasks names no task")
    n_tasks = len(get_tasks(tasks or task_names()))  # unknown tasks before the Hub is asked
    check_unique_tasks(tasks or [])
    check_sizes(args.n_len, args.per_length, n_tasks)
    if args.threads:
        import pyarrow

        pyarrow.set_cpu_count(args.threads)  # Arrow's pool encodes and writes the Parquet files
    check_output_dir(args.output_dir, args.overwrite, "--output-dir", **GUARD)
    if repo:
        require_hub(f"upload to {repo}", offline_hint="build without --push-to-hub, and upload the folder later")
    start = time.perf_counter()
    folder = write_dataset_folder(
        args.output_dir, tasks, args.n_len, args.per_length, args.seed, args.overwrite, args.push_to_hub
    )
    print(f"wrote {folder} in {time.perf_counter() - start:.1f} s")
    if args.push_to_hub:
        print(f"uploaded: {push_dataset_folder(folder, args.push_to_hub, private=args.private)}")
    return 0


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-datasets",
        help="write the tasks as a Hub-ready dataset folder",
        description="Build the iterative tasks' train/test splits as Parquet + a dataset card (optionally upload).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
