"""Tasks from outside the package: import strings ``package.module:attr`` and plug-in packages.

An import string names an :class:`~hf_iterheads.tasks.IterativeTask` object in a module (the convention of uvicorn's
``module:app``); the current directory goes on the import path, so ``--task my_tasks:affine7`` finds
``./my_tasks.py``. A run stores the string (``tasks.task_ref``), so a new process finds the task again.

A plug-in package lists its tasks in the entry-point group ``hf_iterheads.tasks``::

    [project.entry-points."hf_iterheads.tasks"]
    affine7 = "my_tasks:affine7"

and they are then usable by name. Neither route can replace a built-in task: a clash is an error.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib import metadata

from .errors import IterHeadsError
from .tasks import _REGISTRY, _SOURCES, ENTRY_POINT_GROUP, IterativeTask, is_builtin, register_task

_PLUGINS: dict[str, metadata.EntryPoint] | None = None


def _split(ref: str) -> tuple[str, str]:
    module, _, attr = ref.partition(":")
    parts = module.split(".") + attr.split(".")
    if not module or not attr or not all(p.isidentifier() for p in parts):
        raise IterHeadsError(f"cannot read task {ref!r}: write an import string package.module:attr, e.g. my_tasks:affine7")
    return module, attr


def _import(module: str, ref: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            raise IterHeadsError(f"task {ref!r}: no module named {err.name!r} (looked in the current directory "
                                 f"{os.getcwd()} and the installed packages)") from None
        raise IterHeadsError(f"task {ref!r}: importing {module!r} failed: {err}") from err
    except IterHeadsError as err:
        raise IterHeadsError(f"task {ref!r}: importing {module!r} failed: {err}") from err
    except Exception as err:  # the user's module raised while it was imported
        raise IterHeadsError(f"task {ref!r}: importing {module!r} raised {type(err).__name__}: {err}") from err


def _adopt(obj: object, ref: str, what: str) -> IterativeTask:
    """``obj`` registered as the task ``ref`` names, or one clear error."""
    if not isinstance(obj, IterativeTask):
        raise IterHeadsError(f"{what} {ref!r} is a {type(obj).__name__}, not an IterativeTask")
    if is_builtin(obj.name) and _REGISTRY.get(obj.name) is not obj:
        raise IterHeadsError(f"{what} {ref!r} is named {obj.name!r}, a built-in task's name: a built-in cannot be "
                             "replaced; give the task another name")
    known = _REGISTRY.get(obj.name)
    if known is not None and known is not obj:
        raise IterHeadsError(f"{what} {ref!r} is named {obj.name!r}, but another task of that name is already loaded"
                             f"{f' (from {_SOURCES[obj.name]})' if obj.name in _SOURCES else ''}")
    return register_task(obj)


def load_task_ref(ref: str) -> IterativeTask:
    """The task an import string ``package.module:attr`` names, imported, checked and registered."""
    module_name, attr = _split(ref)
    obj = _import(module_name, ref)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise IterHeadsError(f"task {ref!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    task = _adopt(obj, ref, "task")
    _SOURCES.setdefault(task.name, ref)
    return task


def plugins() -> dict[str, metadata.EntryPoint]:
    """The installed plug-ins' entry points, by name (read once per process)."""
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return _PLUGINS


def load_plugin(name: str) -> IterativeTask | None:
    """The plug-in task ``name`` (None when no installed package offers it); a broken one is an error."""
    ep = plugins().get(name)
    if ep is None:
        return None
    ref = f"plug-in {ep.value}"
    try:
        obj = ep.load()
    except Exception as err:
        raise IterHeadsError(f"task {name!r}: loading {ref} raised {type(err).__name__}: {err}") from err
    task = _adopt(obj, ep.value, "plug-in task")
    if task.name != name:
        raise IterHeadsError(f"plug-in task {name!r} ({ep.value}) is named {task.name!r}: the entry point's name and "
                             "the task's must be the same")
    return task


def available_tasks() -> tuple[list[IterativeTask], dict[str, str]]:
    """Every task usable by name here (built-ins, registered, installed plug-ins), and the plug-ins that cannot
    be used, with the reason (a clash with a built-in, an import error)."""
    from .tasks import get_task, task_names

    problems: dict[str, str] = {}
    for name in plugins():
        if name not in _REGISTRY:
            try:
                load_plugin(name)
            except IterHeadsError as err:
                problems[name] = str(err)
        elif is_builtin(name):
            problems[name] = f"plug-in task {name!r} ({plugins()[name].value}) is ignored: a built-in task has that name"
    return [get_task(n) for n in task_names()], problems


def _read_json(path):
    import json

    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # the command that reads the folder says what is wrong with it


def trained_tasks(folder) -> list[str]:
    """The tasks a checkpoint folder of ours says it was trained on (its ``config.json``); [] when it says none."""
    from pathlib import Path

    meta = _read_json(Path(str(folder)) / "config.json")
    meta = meta.get("iterheads") if isinstance(meta, dict) else None
    tasks = meta.get("tasks") if isinstance(meta, dict) else None
    return [str(t) for t in tasks] if isinstance(tasks, list) else []


def register_sources_of(folder) -> None:
    """Import again the tasks a run or checkpoint folder was trained on from a user's module (the import strings
    its ``config.json`` / ``run_config.json`` store), so their names work in this process. Not a folder: nothing."""
    from pathlib import Path

    from .tasks import get_task

    folder = Path(str(folder))
    for name, key in (("config.json", ("iterheads", "task_sources")), ("run_config.json", ("task_sources",))):
        data = _read_json(folder / name)
        for part in key:
            data = data.get(part) if isinstance(data, dict) else None
        for source in data.values() if isinstance(data, dict) else ():
            get_task(source)


# --- ``hf-iterheads tasks`` --------------------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "tasks", help="list the tasks usable by name, with what they are and the training defaults that follow",
        description="List the built-in, registered and installed plug-in tasks (entry-point group "
        f"{ENTRY_POINT_GROUP}), each with its properties and the auto training defaults they give. Any other "
        "task is named by an import string package.module:attr.")
    p.add_argument("refs", nargs="*", metavar="TASK", help="only these tasks (names or import strings module:attr)")
    p.add_argument("--n-len", type=int, default=16, help="the training length the defaults are shown for (default 16)")
    p.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    p.set_defaults(func=run_tasks_cli)


def describe(task: IterativeTask, n_len: int = 16) -> dict:
    """A task's row of ``hf-iterheads tasks``: what it is and the defaults ``train`` resolves for it."""
    import dataclasses

    from .tasks import _SOURCES
    from .training.config import FAST

    cfg = dataclasses.replace(FAST, tasks=[task.name], n_len=n_len)
    props = dataclasses.asdict(task.properties)
    kind = ("built-in" if is_builtin(task.name) else "plug-in" if task.name in plugins()
            else _SOURCES.get(task.name, "registered"))
    return {"name": task.name, "from": kind, "description": task.description, "properties": props,
            "few_inputs": task.properties.few_inputs(n_len),
            "defaults": {k: getattr(cfg, k) for k in ("position_offsets", "restart_at", "restart_below", "max_restarts",
                                                       "length_weights", "max_steps", "curriculum")}}


def run_tasks_cli(args) -> int:
    import json

    from .tasks import get_task

    tasks, problems = available_tasks()
    if args.refs:
        tasks = [get_task(r) for r in args.refs]
    rows = [describe(t, args.n_len) for t in tasks]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        yes = {True: "yes", False: "no", None: "?"}
        head = ["task", "from", "inputs", "states", "reads state", "x_t recoverable", "few inputs", "offsets", "restart",
                "restarts", "lengths", "steps"]
        table = [head] + [[r["name"], r["from"], str(r["properties"]["n_inputs"]), str(r["properties"]["n_states"]),
                           yes[r["properties"]["reads_state"]], yes[r["properties"]["input_recoverable"]],
                           yes[r["few_inputs"]], yes[r["defaults"]["position_offsets"]],
                           (f"{r['defaults']['restart_at']} < {r['defaults']['restart_below']}"
                            if r["defaults"]["restart_at"] else "never"),
                           str(r["defaults"]["max_restarts"]), r["defaults"]["length_weights"], str(r["defaults"]["max_steps"])]
                          for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for why in problems.values():
        print(f"ignored: {why}", file=sys.stderr)
    return 0
