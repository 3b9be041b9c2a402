"""hf-iterheads: the iteration-head mechanism of chain-of-thought, the Hugging Face way."""

from .errors import IterHeadsError
from .tasks import (
    BUILTIN_TASKS,
    PAPER_TASKS,
    IterativeTask,
    get_task,
    make_cumsum_task,
    register_task,
    task_names,
)

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_TASKS",
    "PAPER_TASKS",
    "IterHeadsError",
    "IterativeTask",
    "get_task",
    "make_cumsum_task",
    "register_task",
    "task_names",
]


def __getattr__(name: str):
    # The detector pulls in transformers models; import it only when asked for.
    if name in ("detect_iteration_heads", "IterationHeadDetector"):
        from .detect import detection

        return getattr(detection, name)
    if name in ("register_pattern", "HeadPattern"):
        from .detect import patterns

        return getattr(patterns, name)
    raise AttributeError(name)
