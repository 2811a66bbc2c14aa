"""Fault injection for the tests, in one place: each hook does nothing unless its variable names this moment.

  RLHF_DS_DIE_AT=step:N      SIGKILL rank 0 right after step N;  save:N  in the middle of writing checkpoint N
  RLHF_DS_FAIL_SAVE=R:N      rank R's write of checkpoint N fails as a full disk does (ENOSPC)
  RLHF_DS_SIGNAL_AT=rollout:N   rank 0 sends itself SIGUSR1 after the rollout of step N (a stop asked mid-step);
                             setup:0  once the engines are built (a stop asked during set-up)
"""
from __future__ import annotations

import os
import signal

from rlhf_ds import dist


def die_if_asked(point: str, step: int) -> None:
    if os.environ.get("RLHF_DS_DIE_AT") == f"{point}:{step}" and dist.is_main():
        os.kill(os.getpid(), signal.SIGKILL)


def fail_save_if_asked(step: int) -> None:
    if os.environ.get("RLHF_DS_FAIL_SAVE") == f"{dist.rank()}:{step}":
        raise OSError(28, "No space left on device (injected)")


def signal_if_asked(point: str, step: int) -> None:
    if os.environ.get("RLHF_DS_SIGNAL_AT") == f"{point}:{step}" and dist.is_main():
        os.kill(os.getpid(), signal.SIGUSR1)
