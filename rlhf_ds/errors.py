"""The one user-facing error type, and the wrapper every CLI runs its main function in."""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, bad record). The CLI prints its message, no traceback."""


EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # stopped on SIGTERM/SIGUSR1 after saving a checkpoint: run the same command again to resume


class Preempted(Exception):
    """Raised on every rank after the checkpoint that a SIGTERM / SIGUSR1 asked for has been saved."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a stage's main; turn a UserError into one readable line and a non-zero exit on this rank.

    The process exits with os._exit so that a failing rank does not wait in a collective or in the
    interpreter's teardown; the launcher (deepspeed / torchrun) then stops the other ranks.
    """
    try:
        rc = main(argv) or 0
    except UserError as err:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_USER_ERROR)
    except Preempted as stop:
        from rlhf_ds import dist

        if dist.is_main():
            print(f"stopped: {stop}; run the same command again to resume", file=sys.stderr, flush=True)
        dist.shutdown(EXIT_PREEMPTED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    from rlhf_ds import dist

    dist.shutdown(rc)
