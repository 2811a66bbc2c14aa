"""The one user-facing error type, and the wrapper every CLI runs its main function in."""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, bad record). The CLI prints its message, no traceback."""


EXIT_USER_ERROR = 2
EXIT_LOST_RANK = 3  # another rank died or hung: the message names it
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
    except Exception as err:
        _exit_if_a_rank_is_lost(err)
        raise
    from rlhf_ds import dist

    dist.shutdown(rc)


def _exit_if_a_rank_is_lost(err: Exception) -> None:
    """A failed or timed-out collective usually means another rank died or hangs: say which, and leave at once
    instead of printing a traceback from deep inside torch.distributed (and instead of hanging)."""
    from rlhf_ds import dist

    if dist.world_size() == 1 or not _looks_distributed(err):
        return
    lost = dist.lost_ranks()
    me = f"rank {dist.rank()}"
    if lost is None:
        msg = (f"{me}: lost contact with the rendezvous store (held by rank 0 or the first node's launcher): that "
               f"process is gone")
    elif lost:
        msg = f"{me}: lost {', '.join(lost)}: it stopped responding (died, killed, or hung)"
    else:
        return
    print(f"error: {msg}. This rank stops now ({type(err).__name__}: {str(err).splitlines()[0][:200]}). See that "
          f"rank's own log for why; a run with checkpoints continues with the same command.", file=sys.stderr,
          flush=True)
    os._exit(EXIT_LOST_RANK)


def _looks_distributed(err: Exception) -> bool:
    import torch.distributed as tdist

    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, tdist.DistError) or any(
        word in text for word in ("gloo", "nccl", "c10d", "connection closed by peer", "connection reset", "timed out"))
