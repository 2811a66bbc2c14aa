"""Process-group set-up, rank helpers and the clean shutdown every rank goes through."""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import signal
import socket
import sys
from typing import Any, Iterator

import torch
import torch.distributed as tdist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_launcher_env() -> None:
    """Give the process RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* from whatever started it.

    - torchrun and the deepspeed launcher set them already;
    - `srun` (a SLURM job step, one task per rank, also what `deepspeed --launcher slurm` runs) sets SLURM_* only:
      map them, and take the first host of the step as the master unless MASTER_ADDR is exported;
    - mpirun (`deepspeed --launcher openmpi`): left to DeepSpeed's MPI discovery through mpi4py;
    - plain `python launch/x.py`: rank 0 of a world of 1 (DeepSpeed would try MPI otherwise).
    """
    env = os.environ
    if "RANK" in env or "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # inside srun, not the batch shell itself
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"],
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        # a port fixed by the job id, so that every rank derives the same one without talking to the others
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))


def _first_slurm_host(nodelist: str) -> str:
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        from rlhf_ds.errors import UserError

        raise UserError(f"cannot expand SLURM node list {nodelist!r} with scontrol ({err}); export MASTER_ADDR "
                        f"in the job script") from err
    return out[0]


def init_distributed(timeout_s: int = 1800) -> None:
    """Initialise torch.distributed through DeepSpeed: NCCL on CUDA, gloo on CPU."""
    if tdist.is_available() and tdist.is_initialized():
        return
    _fill_launcher_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    backend = accel.communication_backend_name()
    if accel.device_name() == "cpu":
        backend = "gloo"  # 'ccl' only when Intel's oneCCL bindings are installed; gloo always works
    timeout = datetime.timedelta(seconds=timeout_s)
    # ZeRO reduces over process groups DeepSpeed makes with new_group(), which take torch's module-level default
    # (30 min), not the world group's timeout: make --dist_timeout that default, so every collective honours it.
    c10d = tdist.distributed_c10d
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    if accel.device_name() == "cpu":
        from rlhf_ds.engines.ds_compat import load_shm_op

        load_shm_op()  # clears a build lock a killed start left, which would make DeepSpeed wait forever
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    if accel.device_name() != "cpu":
        accel.set_device(local_rank())
    _start_heartbeat()


# Lost ranks. Every rank bumps a counter in the process group's key-value store every HEARTBEAT_S seconds from a
# daemon thread. When a collective fails (a peer's socket closed) or times out (--dist_timeout: a peer hangs), the
# rank reads the counters twice and names the ranks whose counter stood still. torch.distributed only says
# "connection closed by peer" with an address, or nothing at all until the timeout; the launcher on another node
# never learns of it. Counters, not timestamps, so clocks on different nodes need not agree.
HEARTBEAT_S = 2.0
_HB = "rlhf_ds/heartbeat/"


def _store():
    return tdist.distributed_c10d._get_default_store()


def _start_heartbeat() -> None:
    import threading
    import time

    if world_size() == 1:
        return
    store, me = _store(), rank()
    store.set(f"{_HB}who/{me}", f"{socket.gethostname()} pid {os.getpid()}")

    def beat() -> None:
        failures = 0
        while True:
            try:
                store.add(f"{_HB}beat/{me}", 1)
                failures = 0
            except Exception:  # noqa: BLE001 - a passing store error (a busy store, a network blip): keep trying;
                failures += 1  # a store that is gone for good is found by lost_ranks, not here
            time.sleep(HEARTBEAT_S * min(1 + failures, 5))

    threading.Thread(target=beat, name="rlhf_ds-heartbeat", daemon=True).start()


def lost_ranks() -> list[str] | None:
    """Ranks that stopped beating, as 'rank R (host pid P)'; None when the store itself cannot be reached (the
    process that hosts it, rank 0 or the launcher on the first node, is gone)."""
    import time

    if not (tdist.is_available() and tdist.is_initialized()) or world_size() == 1:
        return []
    try:
        store = _store()
        store.set_timeout(datetime.timedelta(seconds=10))
        counts = [[store.add(f"{_HB}beat/{r}", 0) for r in range(world_size())]]
        for _ in range(2):  # a rank is named only when its counter stood still in two windows in a row
            time.sleep(3 * HEARTBEAT_S)
            counts.append([store.add(f"{_HB}beat/{r}", 0) for r in range(world_size())])
        names = [store.get(f"{_HB}who/{r}").decode() for r in range(world_size())]
    except Exception:  # noqa: BLE001 - the store cannot be reached at all
        return None
    return [f"rank {r} ({names[r]})" for r in range(world_size())
            if r != rank() and counts[0][r] == counts[1][r] == counts[2][r]]


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


def first_problem(problem: str | None) -> str | None:
    """Every rank learns the first problem any rank met (None when none did), so that all of them stop together
    with the same message instead of one raising while the others wait at the next collective."""
    if not tdist.is_initialized() or world_size() == 1:
        return problem
    return next((p for p in all_gather_object(problem) if p), None)


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


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU shared-memory all-reduce (ops/csrc/cpu/comm/shm.cpp) creates a 67 MB segment per rank,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never unlinks it: every run left its
    segments in memory until reboot (240 of them, 16 GB, filled this machine's RAM). Each rank removes its own once
    all ranks have met at the last barrier; the mappings stay valid until the processes exit."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    with contextlib.suppress(OSError):
        os.unlink(name)


def shutdown(rc: int = 0) -> None:
    """Leave without the gloo teardown abort seen with ZeRO-3 on CPU (a gloo worker thread releasing a tensor
    during interpreter finalisation): collect garbage, meet at a barrier, destroy the group, flush, _exit."""
    gc.collect()
    if tdist.is_available() and tdist.is_initialized():
        with contextlib.suppress(Exception):
            tdist.barrier()
        _unlink_shm_buffer()
        with contextlib.suppress(Exception):
            tdist.destroy_process_group()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun DeepSpeed's MPI discovery initialised MPI: mpirun counts an
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():  # exit without Finalize as a crash
        with contextlib.suppress(Exception):
            mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


class StopSignal:
    """SIGTERM and SIGUSR1 (what SLURM sends before preemption or the time limit, e.g. --signal=USR1@120) set a
    flag; the training loop asks `requested()` after every step, and all ranks agree on it, so that they finish the
    same step, save together and stop together."""

    def __init__(self) -> None:
        self.received: int | None = None  # the signal this rank got
        self.seen: int | None = None  # the signal some rank got, once requested() has agreed on it
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        # one slot per signal, summed over ranks: every rank learns that a stop was asked for, and which signal
        flags = torch.tensor([1.0 if self.received == sig else 0.0 for sig in (signal.SIGTERM, signal.SIGUSR1)])
        flags = all_reduce_sum(flags)
        if flags.sum().item() == 0:
            return False
        self.seen = signal.SIGTERM if flags[0].item() > 0 else signal.SIGUSR1
        return True

    def describe(self) -> str:
        return signal.Signals(self.seen or self.received).name
