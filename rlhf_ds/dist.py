"""Process-group set-up, rank helpers and the clean shutdown every rank goes through."""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import sys
from typing import Any, Iterator

import torch
import torch.distributed as tdist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_single_process_env() -> None:
    """`python launch/x.py` with no launcher: act as rank 0 of a world of 1 (DeepSpeed would try MPI otherwise)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(timeout_s: int = 1800) -> None:
    """Initialise torch.distributed through DeepSpeed: NCCL on CUDA, gloo on CPU."""
    if tdist.is_available() and tdist.is_initialized():
        return
    _fill_single_process_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    backend = accel.communication_backend_name()
    if accel.device_name() == "cpu":
        backend = "gloo"  # 'ccl' only when Intel's oneCCL bindings are installed; gloo always works
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s), verbose=False
    )
    if accel.device_name() != "cpu":
        accel.set_device(local_rank())


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the body first (filling caches: converted models, tokenised data), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, local_rank())


def all_gather_object(obj: Any) -> list[Any]:
    if not tdist.is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not tdist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; returned on the tensor's own device (the reduction runs on the accelerator, since NCCL
    cannot reduce CPU tensors)."""
    if tdist.is_initialized() and world_size() > 1:
        work = values.to(device(), copy=True)
        tdist.all_reduce(work)
        return work.to(values.device)
    return values


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(values) / world_size()


def shutdown(rc: int = 0) -> None:
    """Leave without the gloo teardown abort seen with ZeRO-3 on CPU (a gloo worker thread releasing a tensor
    during interpreter finalisation): collect garbage, meet at a barrier, destroy the group, flush, _exit."""
    gc.collect()
    if tdist.is_available() and tdist.is_initialized():
        with contextlib.suppress(Exception):
            tdist.barrier()
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


class StopSignal:
    """SIGTERM and SIGUSR1 (what SLURM sends before preemption or the time limit, e.g. --signal=USR1@120) set a
    flag; the training loop asks `requested()` after every step, and all ranks agree on it, so that they finish the
    same step, save together and stop together."""

    def __init__(self) -> None:
        import signal

        self.received: int | None = None  # the signal this rank got
        self.seen: int | None = None  # the signal some rank got, once requested() has agreed on it
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        import signal

        # one slot per signal, summed over ranks: every rank learns that a stop was asked for, and which signal
        flags = torch.tensor([1.0 if self.received == sig else 0.0 for sig in (signal.SIGTERM, signal.SIGUSR1)])
        flags = all_reduce_sum(flags)
        if flags.sum().item() == 0:
            return False
        self.seen = signal.SIGTERM if flags[0].item() > 0 else signal.SIGUSR1
        return True

    def describe(self) -> str:
        import signal

        return signal.Signals(self.seen or self.received).name
