"""All-or-nothing output folders: work happens in a hidden sibling folder, renamed into place at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import IterHeadsError


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output folder that holds something (unless ``overwrite``) or is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IterHeadsError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise IterHeadsError(f"output directory {path} exists and is not empty (pass --overwrite to replace it)")
    return path


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, a path that cannot be created or written (``/proc/x``, a path under a file, a
    read-only place): a temporary entry is made and removed in its nearest existing folder, nothing stays."""
    path = Path(path).absolute()
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise IterHeadsError(f"cannot write {path}: {parent} is a file, not a directory")
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".hf-iterheads-probe-", dir=parent))
    except OSError as err:
        raise IterHeadsError(f"cannot write {path}: nothing can be created in {parent} ({err.strerror or err})") from None


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


def write_json_atomic(obj, path: str | Path) -> None:
    """Write JSON to ``path`` via a temporary file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
