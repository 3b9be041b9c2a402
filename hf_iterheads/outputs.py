"""Output paths: checked before any work, written all-or-nothing.

``check_writable`` proves, before a minute of work is spent, that an output path can be created (it creates
and removes one temporary entry in the nearest existing folder, and leaves nothing behind). Folders are
then written in a hidden sibling folder renamed into place at the end, files via a temporary file and a
rename: a failure or a kill never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from .errors import IterHeadsError

PROBE_PREFIX = ".hf-iterheads-probe-"


def _exists(path: Path, shown: Path) -> bool:
    """``path.exists()``, with the errors it may raise (permission, a name too long) as one clear line."""
    try:
        return path.exists()
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise IterHeadsError(f"cannot use output path {shown}: {reason}") from None


def _nearest_existing(path: Path, shown: Path) -> Path:
    """The nearest folder at or above ``path`` that exists; a file on the way is refused by name."""
    for candidate in (path, *path.parents):
        if _exists(candidate, shown):
            if not candidate.is_dir():
                raise IterHeadsError(f"cannot create output path {shown}: {candidate} is a file, not a folder")
            return candidate
    raise IterHeadsError(f"cannot create output path {shown}: no existing folder above it")


def _probe(folder: Path, shown: Path) -> None:
    """Create and remove one temporary folder in ``folder``: the only sure test that it can be written."""
    try:
        tmp = tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=folder)
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise IterHeadsError(f"cannot write output path {shown}: cannot create anything in {folder} ({reason})") from None
    os.rmdir(tmp)


def check_writable(path: str | Path, kind: Literal["dir", "file"] = "dir", flag: str = "output path") -> Path:
    """Refuse, before any work and creating nothing, an output ``path`` that cannot be written.

    ``kind="dir"``: ``path`` must be a folder or not exist; ``kind="file"``: a regular file or not exist
    (never a folder, nor a device such as ``/dev/null`` that a rename would replace). The probe runs in
    ``path`` itself when it is an existing folder, else in its nearest existing ancestor. ``flag`` names the
    option in the message (e.g. ``--output-dir``).
    """
    if str(path) == "":
        raise IterHeadsError(f"{flag} is empty")
    shown = Path(path)
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if _exists(path, shown):
        if kind == "dir" and not path.is_dir():
            raise IterHeadsError(f"{flag} {shown} is a file; a folder is expected there")
        if kind == "file" and path.is_dir():
            raise IterHeadsError(f"{flag} {shown} is a folder; a file path is expected (e.g. {shown / 'eval.json'})")
        if kind == "file" and not path.is_file():
            raise IterHeadsError(f"{flag} {shown} exists and is not a regular file")
    _probe(_nearest_existing(path if kind == "dir" else path.parent, shown), shown)
    return shown


def check_output_dir(path: str | Path, overwrite: bool = False, flag: str = "output directory") -> Path:
    """Refuse, before any work, an output folder that holds something (unless ``overwrite``), is a file, or
    whose parent cannot be written (the folder is built beside it and renamed into place)."""
    check_writable(path, "dir", flag)
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise IterHeadsError(f"{flag} {path} exists and is not empty (pass --overwrite to replace it)")
    parent = Path(os.path.abspath(path)).parent
    _probe(_nearest_existing(parent, path), path)
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


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; renamed onto ``path`` on success, removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, (path.stat().st_mode & 0o7777) if path.is_file() else 0o644)  # a rewrite keeps the mode
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json_atomic(obj, path: str | Path) -> None:
    """Write JSON to ``path`` via a temporary file and a rename: never a half-written file."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")


def read_jsonl(path: str | Path, torn_tail_ok: bool = False) -> list[dict]:
    """The records of a JSON-lines file; a line that is not a JSON object is refused naming file and line
    (a hand edit or a disk-full write must not surface as a traceback). ``torn_tail_ok``: a broken last line
    (a process killed mid-write) is dropped instead."""
    path = Path(path)
    lines = path.read_bytes().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise IterHeadsError(f"{path} line {number} is not a JSON object")
        except (json.JSONDecodeError, UnicodeDecodeError, IterHeadsError) as err:
            if torn_tail_ok and number == len(lines):
                break
            if isinstance(err, IterHeadsError):
                raise
            what = f"not valid JSON ({err.msg})" if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
            raise IterHeadsError(f"{path} line {number} is {what}") from None
        records.append(record)
    return records
