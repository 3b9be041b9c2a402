"""Shared test setup: no network ever, private Hugging Face caches, and a way to lay folders into a Hub cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Every cache the libraries write goes to one folder per test run, set before any of them is imported (their
# config modules read the environment once): the user's ~/.cache/huggingface is never read nor written, and a
# dataset folder loaded by an earlier test run cannot answer for another one. Subprocesses inherit it.
PRIVATE_HF = Path(tempfile.mkdtemp(prefix="hf-iterheads-tests-"))
os.environ["HF_HOME"] = str(PRIVATE_HF / "hf_home")
os.environ["HF_HUB_CACHE"] = str(PRIVATE_HF / "hf_home" / "hub")
os.environ["HF_DATASETS_CACHE"] = str(PRIVATE_HF / "datasets")
os.environ["HF_XET_CACHE"] = str(PRIVATE_HF / "hf_home" / "xet")

FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session", autouse=True)
def private_hf_caches() -> Iterator[Path]:
    """The session's private caches (see ``PRIVATE_HF``), checked to be in force and removed at the end."""
    import datasets.config
    import huggingface_hub.constants

    assert Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(PRIVATE_HF), datasets.config.HF_DATASETS_CACHE
    assert Path(huggingface_hub.constants.HF_HUB_CACHE).is_relative_to(PRIVATE_HF), huggingface_hub.constants.HF_HUB_CACHE
    yield PRIVATE_HF
    shutil.rmtree(PRIVATE_HF, ignore_errors=True)


def lay_into_hub_cache(
    folder: str | Path,
    repo_id: str,
    hub_cache: str | Path,
    repo_type: str = "model",
    revision: str = "main",
    commit: str = FAKE_REVISION,
) -> Path:
    """Copy ``folder`` into ``hub_cache`` as ``{type}s--ORG--NAME/snapshots/COMMIT`` with ``refs/REVISION`` -> COMMIT.

    That is the layout ``huggingface_hub`` writes when it downloads a repo, so ``from_pretrained("ORG/NAME",
    revision=REVISION)`` and ``snapshot_download`` resolve it with ``HF_HUB_OFFLINE=1``. Call it once per
    revision (a branch such as Pythia's ``step1000``) with its own commit to lay several.
    """
    root = Path(hub_cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snapshot = root / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A fresh, empty Hub cache for this test (HF_HUB_CACHE points at it); returns its path."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache
