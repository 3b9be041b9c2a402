"""What a scan covers, read from its command line: (model, revision) pairs, tasks, the detector options it
forwards, and the settings a resumed scan must share. Torch-free, so ``scan --help`` and bad input answer fast."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path
from typing import Any

from ..bundled import is_local as _is_local  # torch-free: a local folder or bundled checkpoint has no revisions
from ..errors import IterHeadsError
from ..tasks import get_task
from ..tasks import parse_lengths as _parse_lengths


def parse_lengths(spec) -> list[int]:
    """Probe lengths (at least 2: a probe needs a step to look back on); torch-free, so ``scan --help`` is fast."""
    return _parse_lengths(spec, minimum=2)

DEFAULT_TASKS = "parity,binary_copy,polynomial"
PARTS = "parts"
# Options that change no number: a resumed run may differ in these.
RUN_ONLY = {"device", "device_map", "batch_size"}

# detect options that apply to a scan: (flag, add_argument keywords). The dest is the keyword the detector takes.
FORWARDED: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--rendering", dict(choices=("auto", "native", "text"), default="auto", help="native layout or text (default: auto)")),
    ("--template", dict(action="append", default=None, help='text template, e.g. "{inputs} -> {states}"; repeat it for several')),
    ("--shots", dict(type=int, default=0, help="worked examples of the task before each probe (text rendering; default 0)")),
    ("--chat", dict(action="store_true", help="wrap the examples and the probe in the tokenizer's chat template")),
    ("--seed", dict(type=int, default=0, help="probe seed (default 0)")),
    ("--batch-size", dict(type=int, default=16, help="probes per forward pass (default 16)")),
    ("--ablate", dict(action="store_true", help="zero- and mean-ablate the top-k heads of each triple vs random heads")),
    ("--top-k", dict(type=int, default=1, help="heads to ablate / patch (default 1)")),
    ("--patch", dict(action="store_true", help="counterfactual patching of the top-k heads (share of the logit difference moved)")),
    ("--capture", dict(choices=("auto", "rows", "eager"), default="auto",
                       help="attention capture (default auto: row-sliced, eager fallback)")),
    ("--dtype", dict(choices=("auto", "float32", "float16", "bfloat16"), default="float32", help="weights dtype")),
    ("--device", dict(default="cpu", help="cpu, cuda, mps, auto (auto under accelerate launch: each process its own device)")),
    ("--device-map", dict(default=None, help="passed to from_pretrained, e.g. auto for big models (needs accelerate)")),
    ("--trust-remote-code", dict(action="store_true", help="allow repos' own modeling code (off by default)")),
)


# --- what to scan ----------------------------------------------------------------------------------------


def model_specs(models: list[str], models_file: str | None = None, revisions: str | None = None) -> list[tuple[str, str | None]]:
    """(model, revision) pairs. ``NAME@rev1,rev2`` gives a model its own revisions; ``--revisions`` applies to
    Hub ids without one; local folders and bundled checkpoints have none."""
    entries = list(models)
    if models_file:
        path = Path(models_file)
        if not path.is_file():
            raise IterHeadsError(f"--models-file {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first name
        except UnicodeDecodeError:
            raise IterHeadsError(f"--models-file {path} is not UTF-8 text (one model per line)") from None
        if "\x00" in text:
            raise IterHeadsError(f"--models-file {path} is a binary file, not a list of models (one per line)")
        entries += [line.split("#", 1)[0].strip() for line in text.splitlines()]
    default = [r.strip() for r in revisions.split(",") if r.strip()] if revisions else [None]
    out: list[tuple[str, str | None]] = []
    for entry in filter(None, entries):
        name, revs = entry, default
        if "@" in entry and not _is_local(entry):
            name, _, spec = entry.partition("@")
            revs = [r.strip() for r in spec.split(",") if r.strip()]
            if not name or not revs:
                raise IterHeadsError(f"cannot read model {entry!r}: write NAME or NAME@REV[,REV...]")
            if _is_local(name):
                raise IterHeadsError(f"{name!r} is a local folder or bundled checkpoint: it has no revisions ({entry!r})")
        elif _is_local(entry):
            if revisions:
                print(f"note: --revisions does not apply to {entry} (a local folder or bundled checkpoint has none): "
                      "scanned once", file=sys.stderr)
            revs = [None]
        for rev in revs:
            if (name, rev) not in out:
                out.append((name, rev))
    if not out:
        raise IterHeadsError("no models to scan: name them, or pass --models-file")
    return out


def task_list(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise IterHeadsError("--tasks is empty")
    return [get_task(t).name for t in names]


def part_key(model: str, revision: str | None, task: str) -> str:
    """A readable, collision-free file name for one triple."""
    raw = f"{model}\0{revision or ''}\0{task}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(model).name if _is_local(model) else model}@{revision or '-'}@{task}")
    return f"{slug[:80]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"


def step_of(revision: str | None) -> int | None:
    """The training step in a revision name (Pythia's ``step143000``), or None."""
    m = re.search(r"(?:^|[^a-z])step[_-]?(\d+)", (revision or "").lower())
    return int(m.group(1)) if m else None


def settings(n: int, lengths: str, options: dict[str, Any]) -> dict[str, Any]:
    """What decides the numbers of a triple: a resumed scan must use the same."""
    return {"n": int(n), "lengths": parse_lengths(lengths), **{k: v for k, v in sorted(options.items()) if k not in RUN_ONLY}}
