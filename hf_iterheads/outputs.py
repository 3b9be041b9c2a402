"""All-or-nothing output folders: work happens in a hidden sibling folder, renamed into place at the end."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import IterHeadsError


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output folder that holds something (unless ``overwrite``) or is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IterHeadsError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise IterHeadsError(f"output directory {path} exists and is not empty (pass --overwrite to replace it)")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path``, on any error it vanishes."""
    path = check_output_dir(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{tmp.name[-8:]}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
