"""Shared test setup: no network ever, and a way to lay folders into a Hub cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"


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
