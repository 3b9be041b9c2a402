"""The reference checkpoints shipped inside the package, found without importing torch (so a command can name or
refuse one before its heavy imports). ``modeling`` re-exports these names."""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).parent / "checkpoints"  # reference checkpoints shipped with the package


def bundled_checkpoints() -> list[str]:
    """Short names of the reference checkpoints shipped inside the package (e.g. ``polynomial-cot``)."""
    return sorted(p.parent.name for p in BUNDLED.glob("*/config.json"))


def is_local(name: str) -> bool:
    """A local folder or a checkpoint bundled with the package: a model with no Hub revisions."""
    return Path(name).expanduser().is_dir() or bundled_path(name) is not None


def bundled_path(name: str) -> Path | None:
    """The folder of a bundled checkpoint by short name, or None."""
    path = BUNDLED / str(name)
    return path if "/" not in str(name) and (path / "config.json").is_file() else None
