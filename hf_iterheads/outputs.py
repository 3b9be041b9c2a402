"""Output paths: checked before any work, written all-or-nothing, never over what the command did not make.

``check_writable`` proves, before a minute of work is spent, that an output path can be created (it creates
and removes one temporary entry in the nearest existing folder, and leaves nothing behind). Folders are
then written in a hidden sibling folder renamed into place at the end, files via a temporary file and a
rename: a failure or a kill never leaves a half-written output.

What a user keeps for weeks must survive a mistyped path: ``--overwrite`` replaces only a folder that the same
command wrote (its marker file :data:`OUTPUT_MARKER`, or a layout test) or an empty one, and no output may
overlap an input of the same command (:func:`check_not_input`). One process writes a folder at a time
(:func:`folder_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from .errors import IterHeadsError

PROBE_PREFIX = ".hf-iterheads-probe-"
OUTPUT_MARKER = ".hf-iterheads-output.json"  # {"command": ...}: which command wrote the folder (it may replace it)
LOCK_NAME = ".hf-iterheads.lock"  # {"pid", "host", "start"}: the process writing the folder now


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


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def check_not_input(output: str | Path, inputs: dict[str, str | Path | None], flag: str = "output path") -> None:
    """Refuse an ``output`` that is, lies inside, or holds one of ``inputs`` (flag -> local path; a value that
    is not an existing local path, such as a Hub id or a bundled name, is skipped): writing there would change or
    delete what the command reads."""
    out = _real(output)
    for name, value in inputs.items():
        if value is None or str(value) == "" or not os.path.exists(os.path.expanduser(str(value))):
            continue
        src = _real(value)
        if out == src:
            raise IterHeadsError(f"{flag} {output} is the {name} {value}: the command would overwrite its own input")
        if src in out.parents:
            raise IterHeadsError(f"{flag} {output} is inside the {name} {value}: the command never writes into its input")
        if out in src.parents:
            raise IterHeadsError(f"{flag} {output} holds the {name} {value}: replacing it would delete the input")


def written_by(folder: Path) -> str | None:
    """The command named by the folder's :data:`OUTPUT_MARKER`, or None (no marker, or not readable)."""
    try:
        data = json.loads((folder / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("command") if isinstance(data, dict) else None


def write_marker(folder: Path, command: str) -> None:
    """Mark ``folder`` as written by ``command``: a later ``--overwrite`` of the same command may replace it."""
    from . import __version__

    (folder / OUTPUT_MARKER).write_text(json.dumps({"command": command, "version": __version__}) + "\n")


def check_replaceable(path: Path, command: str, layout: Callable[[Path], bool] | None = None, flag: str = "output directory") -> None:
    """Refuse to ``--overwrite`` a non-empty folder that ``command`` did not write (no matching marker and, when
    given, ``layout(path)`` is false): it may hold someone's checkpoint, run or data."""
    entries = [p for p in path.iterdir() if p.name != LOCK_NAME]
    if not entries or written_by(path) == command or (layout is not None and layout(path)):
        return
    other = written_by(path)
    what = f"it was written by hf-iterheads {other}" if other else f"it was not written by hf-iterheads {command}"
    raise IterHeadsError(f"refusing to --overwrite {flag} {path}: {what} (it holds {len(entries)} entries such as "
                         f"{sorted(p.name for p in entries)[0]}); remove it yourself or choose another folder")


def check_output_dir(
    path: str | Path,
    overwrite: bool = False,
    flag: str = "output directory",
    command: str | None = None,
    layout: Callable[[Path], bool] | None = None,
    inputs: dict[str, str | Path | None] | None = None,
) -> Path:
    """Refuse, before any work, an output folder that holds something (unless ``overwrite``), is a file, or
    whose parent cannot be written (the folder is built beside it and renamed into place).

    With ``command``, ``--overwrite`` replaces only a folder that command wrote (:func:`check_replaceable`);
    ``inputs`` (flag -> path) may not overlap the output (:func:`check_not_input`)."""
    check_writable(path, "dir", flag)
    path = Path(path)
    if inputs:
        check_not_input(path, inputs, flag)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise IterHeadsError(f"{flag} {path} exists and is not empty (pass --overwrite to replace it)")
        if command is not None:
            check_replaceable(path, command, layout, flag)
        check_not_in_use(path, flag)
    parent = Path(os.path.abspath(path)).parent
    _probe(_nearest_existing(parent, path), path)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused PID from the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def clean_stale_siblings(path: Path) -> None:
    """Remove the hidden ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` folders of ``path`` that a killed process of
    this host left (its PID is gone); a live writer's are kept."""
    for entry in path.parent.glob(f".{path.name}.*-*"):
        kind, _, rest = entry.name[len(path.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and entry.is_dir() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def remove_atomically(path: Path) -> None:
    """Rename ``path`` to a hidden sibling, then delete that: the name never shows a half-deleted folder."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(
    path: str | Path,
    overwrite: bool = False,
    command: str | None = None,
    layout: Callable[[Path], bool] | None = None,
    inputs: dict[str, str | Path | None] | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path``, on any error it vanishes.

    The old folder (if ``overwrite`` and :func:`check_output_dir` allow) is swapped out by renames and only then
    deleted; with ``command``, the new folder carries its marker. Temporary folders a killed build left beside
    ``path`` are removed first."""
    path = check_output_dir(path, overwrite, command=command, layout=layout, inputs=inputs).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        if command is not None:
            write_marker(tmp, command)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- one writer per folder ----------------------------------------------------------------------------------

_HELD: dict[Path, int] = {}  # lock files this process holds -> nesting depth


def _lock_owner(lock: Path) -> dict | None:
    """The owner recorded in ``lock``, or None when it is gone; an unreadable lock is reported as such."""
    try:
        data = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": "?", "unreadable": True}
    return data if isinstance(data, dict) else {"pid": None, "host": "?", "unreadable": True}


def _is_stale(owner: dict) -> bool:
    """A lock of this host whose process is gone (or whose PID now belongs to a later process) is stale."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if not _pid_alive(pid):
        return True
    return owner.get("start") is not None and _start_time(pid) not in (None, owner["start"])


def _in_use_message(folder: Path, owner: dict, flag: str) -> str:
    lock = folder / LOCK_NAME
    if owner.get("unreadable"):
        return f"{flag} {folder} is locked ({lock} is not readable); delete that file if no process writes the folder"
    return (f"{flag} {folder} is in use by process {owner.get('pid')} on {owner.get('host')} (lock file {lock}); "
            "wait for it to finish, or stop it first")


def check_not_in_use(folder: str | Path, flag: str = "output directory") -> None:
    """Refuse, without taking it, a folder another live process holds (a stale lock is ignored)."""
    folder = Path(folder)
    owner = _lock_owner(folder / LOCK_NAME)
    if owner is not None and folder.absolute() / LOCK_NAME not in _HELD and not _is_stale(owner):
        raise IterHeadsError(_in_use_message(folder, owner, flag))


@contextlib.contextmanager
def folder_lock(folder: str | Path, flag: str = "output directory") -> Iterator[Path]:
    """Hold the advisory lock of ``folder`` (created if missing) while the block runs: one writer at a time.

    The lock file holds PID, host and process start time; a lock of a process of this host that is gone is
    stale and taken over. Nested use in one process is allowed. A folder the block created and left empty is
    removed again, so a command that fails early leaves nothing."""
    folder = Path(folder).absolute()
    lock = folder / LOCK_NAME
    if lock in _HELD:
        _HELD[lock] += 1
        try:
            yield folder
        finally:
            _HELD[lock] -= 1
        return
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # removed again if left empty
    folder.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and not _is_stale(owner):
                _remove_empty(created)
                raise IterHeadsError(_in_use_message(folder, owner, flag)) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale (or gone meanwhile): take it over
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise IterHeadsError(f"{flag} {folder}: cannot take its lock {lock}")
    _HELD[lock] = 1
    try:
        yield folder
    finally:
        del _HELD[lock]
        if (_lock_owner(lock) or {}).get("pid") == me["pid"]:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        _remove_empty(created)  # only when empty: a failed start leaves nothing behind


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


# --- identities for the datasets cache ----------------------------------------------------------------------


def content_fingerprint(files: Iterable[Path]) -> str:
    """sha256 (first 16 hex digits) over the files' names and bytes, in name order."""
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def fingerprint_configs(folder: Path, configs: list[dict]) -> list[dict]:
    """``configs`` (the card's ``configs:`` entries) each with a ``description`` naming the sha256 of its data files.

    Why: ``datasets`` keys its cache of a local folder by the folder's base name, the config name and a hash of
    the card, not by the files' bytes; two folders named alike (every atlas's ``hub``) would share one cache
    entry and ``load_dataset`` would return the first one's rows. The description is part of that hash."""
    out = []
    for config in configs:
        files = [f for entry in config["data_files"] for f in folder.glob(entry["path"]) if f.is_file()]
        out.append({**config, "description": f"hf-iterheads content sha256:{content_fingerprint(files)}"})
    return out


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
