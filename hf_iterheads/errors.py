"""One exception type for mistakes a user can fix: the CLI prints it as one line, no traceback."""


class IterHeadsError(ValueError):
    """Bad input (unknown task, impossible length, unusable model ...): message is meant for a person."""
