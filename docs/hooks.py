"""MkDocs hooks: the pages generated at build time, so that they cannot drift from the code and the data.

* ``reference/cli.md``: the ``--help`` of every ``hf-iterheads`` command, from ``hf_iterheads.cli.build_parser()``;
* ``results/*.md``: the Results pages, from the data files (``docs/render_results.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from mkdocs.structure.files import File

HERE = Path(__file__).resolve().parent


def _render_results():
    spec = importlib.util.spec_from_file_location("render_results", HERE / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_page() -> str:
    """Every command's ``--help``, exactly as the terminal prints it (80 columns)."""
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal width; fix it so the page is stable
    from hf_iterheads.cli import build_parser

    parser = build_parser()
    lines = ["# CLI reference", "",
             "Generated at build time from `hf_iterheads.cli.build_parser()`: each block is exactly what "
             "`hf-iterheads COMMAND --help` prints. Every command can also be run as "
             "`python -m hf_iterheads.cli COMMAND` (the form `accelerate launch -m hf_iterheads.cli` uses).", "",
             "```text", parser.format_help().rstrip(), "```", ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                lines += [f"## `{name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def on_files(files, config):
    pages = {"reference/cli.md": cli_page}
    results = _render_results()
    for uri, (render, _target) in results.PAGES.items():
        pages[uri] = render
    for uri, render in pages.items():
        existing = files.get_file_from_path(uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, content=render()))
    return files
