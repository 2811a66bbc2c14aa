"""The one user-facing error type, the stop after a checkpoint, and the exit codes (rlhf_ds/cli.py uses them)."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, bad record). The CLI prints its message, no traceback."""


EXIT_USER_ERROR = 2
EXIT_LOST_RANK = 3  # another rank died or hung: the message names it
EXIT_PREEMPTED = 75  # stopped on SIGTERM/SIGUSR1 after saving a checkpoint: run the same command again to resume


class Preempted(Exception):
    """Raised on every rank after the checkpoint that a SIGTERM / SIGUSR1 asked for has been saved."""
