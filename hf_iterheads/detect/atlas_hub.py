"""The atlas on the Hub: ``DIR/hub`` (one Parquet file per config and a dataset card), pushed unless a dry run.

The atlas itself (rows, summary, report) is :mod:`.atlas`; this module only packages and uploads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import __version__
from ..errors import IterHeadsError
from .atlas import COLUMNS, SUMMARY_DOCS, part_rows, summary_md, summary_rows, to_dataset
from .html import PAPER

CARD = """# {name}

An atlas of **iteration heads** in causal language models, made with
hf-iterheads {version} (`hf-iterheads scan`). The iteration head is the attention head
that, while a model writes a chain of thought, looks back at the input token the next step needs:
Cabannes et al., "Iteration Head: A Mechanistic Study of Chain-of-Thought" ({paper}).

{summary}

## Configs

- `heads` (default): one row per model x revision x task x layer x head; a failed (model, revision, task) is one
  row with `status = failed` and its `error`.
- `summary`: {summary_docs}.

```python
from datasets import load_dataset
heads = load_dataset("{repo}", split="train")            # or a local copy of this folder
summary = load_dataset("{repo}", "summary", split="train")
```

## Columns of `heads`

{columns}

Other columns are copied from the detector's scores.json: every other layer x head grid per head, every
scalar as is, nested numbers flattened with `_` (e.g. `ablation_zero_top_token_accuracy`: token accuracy with the
found heads zero-ablated; `ablation_zero_random_mean_token_accuracy`: the same for random heads), lists as JSON.

## How the scores are computed

Probes are teacher-forced chains of thought of the task ({settings}). Attention probabilities are captured inside
each model's own eager attention and reduced to the scores above layer by layer. Chance is the uniform attention
over the keys a query sees. Ablation zeroes (or mean-replaces) the heads' slice at the input of the attention's
output projection and compares with as many random heads.
"""


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def publish(out: Path, repo_id: str, dry_run: bool = False) -> str:
    """Write the Hub dataset folder ``DIR/hub`` (Parquet per config + card); upload it unless ``dry_run``."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from ..outputs import atomic_output_dir, fingerprint_configs

    parts = [json.loads(f.read_text()) for f in sorted((out / "parts").glob("*.json"))]
    with atomic_output_dir(out / "hub", overwrite=True) as tmp:
        (tmp / "heads").mkdir()
        (tmp / "summary").mkdir()
        shutil.copyfile(out / "results.parquet", tmp / "heads" / "train-00000-of-00001.parquet")
        to_dataset(summary_rows(parts), typed={}).to_parquet(str(tmp / "summary" / "train-00000-of-00001.parquet"))
        n_rows = sum(len(part_rows(p)) for p in parts)
        data = DatasetCardData(
            license="mit",
            pretty_name=f"Iteration-head atlas ({repo_id})",
            tags=["interpretability", "attention-heads", "iteration-head", "chain-of-thought", "hf-iterheads"],
            size_categories=[_size_category(n_rows)],
            configs=fingerprint_configs(tmp, [  # each folder's own datasets cache entry (every atlas's is named hub)
                {"config_name": "heads", "data_files": [{"split": "train", "path": "heads/train-*.parquet"}], "default": True},
                {"config_name": "summary", "data_files": [{"split": "train", "path": "summary/train-*.parquet"}]},
            ]),
        )
        columns = "\n".join(f"- `{k}` ({t}): {doc}" for k, (t, doc) in COLUMNS.items())
        settings = next((p["settings"] for p in parts), {})
        body = CARD.format(name=f"Iteration-head atlas: {repo_id}", version=__version__, paper=PAPER, repo=repo_id,
                           summary=summary_md(parts).split("\n", 2)[2].split("\n## How")[0].strip(), summary_docs=SUMMARY_DOCS,
                           columns=columns, settings=", ".join(f"{k} {v}" for k, v in settings.items()))
        DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(tmp / "README.md")
    folder = out / "hub"
    if dry_run:
        return f"dry run: the dataset folder for {repo_id} is {folder} (nothing uploaded)"
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
                                 commit_message=f"hf-iterheads {__version__} scan")
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IterHeadsError(f"cannot push to {repo_id}: {first} (the folder is ready: {folder})") from None
    return f"pushed {folder} to https://huggingface.co/datasets/{repo_id} ({getattr(info, 'oid', '')})"
