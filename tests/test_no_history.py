"""The project speaks of what it is, never of how it was made.

Every tracked text file (code, comments, docstrings, tests, model cards, docs, benchmark results and their data
files) is searched for references to the work's own history: numbered work sessions or issues, an unnamed
"issue" whose goal a comment quotes, a session something happened before. Git keeps the history; a reader of the
tree cannot know what those refer to. This file assembles its examples of such phrasings from parts, and is not searched.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HISTORY = re.compile(
    r"\b[Ss]essions?\s+#?\d+"                      # a numbered work session, or a range of them
    r"|\b[Ii]ssues?\s+#?\d+"                       # a numbered issue
    r"|\b(?:[Tt]he|[Tt]his|[Tt]hat)\s+issue(?:'s)?\b"  # the goal, as the issue asks
    r"|\b(?:this|that|earlier|previous|last|next|a\s+later)\s+session(?:'s)?\b"
    r"|\b(?:before|since|after|until)\s+session\b"
)


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file() or path == Path(__file__).resolve():  # deleted, not committed; or this file
            continue
        with open(path, "rb") as f:
            if b"\0" in f.read(8192):  # binary (weights, images, archives)
                continue
        files.append(path)
    return files


def history_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in HISTORY.finditer(line):
            found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()[:160]}")
    return found


def test_pattern_catches_history_and_spares_the_rest():
    s, i = "session", "issue"  # the examples are assembled, so that no line of this file reads as history itself
    for said in (f"as in {s} 7", f"{s}s 6-11", f"{i} 12", f"{i.title()} #33", f"the {i}'s goal", f"before {s}",
                 f"recorded this {s}"):
        assert HISTORY.search(said), said
    for said in (f"pytest's {s} fixture", f"loaded once per {s}", f"an {i} with the tokenizer", f"t{i} 3",
                 f"the {s} scope"):
        assert not HISTORY.search(said), said


def test_no_tracked_file_speaks_of_the_history():
    found = [hit for path in tracked_text_files() for hit in history_lines(path)]
    assert not found, f"{len(found)} history references in tracked files:\n" + "\n".join(found)
