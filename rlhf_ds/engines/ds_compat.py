"""Every use of DeepSpeed's private APIs, in one place: what rlhf_ds needs that DeepSpeed 0.19 has no public call
for. When DeepSpeed changes, this is the file to check (the tests that cover each function are named beside it).
"""
from __future__ import annotations

import contextlib
import pickle
from argparse import Namespace
from pathlib import Path
from typing import Callable, Iterator

import torch


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """A ZeRO-3 engine's whole 16-bit state dict on rank 0 (tests/trainers: every save under ZeRO-3)."""
    return engine._zero3_consolidated_16bit_state_dict()


def zero_offload(engine):
    """The DeepSpeedZeRoOffload object that owns a ZeRO-3 engine's module hooks."""
    opt = engine.optimizer
    return opt.parameter_offload if hasattr(opt, "parameter_offload") else opt


def zero3_hook_counts(engine) -> tuple[int, int]:
    """How many forward and backward hooks ZeRO-3 has on the module (tests/workers/hybrid_check.py)."""
    offload = zero_offload(engine)
    return len(offload.forward_hooks), len(offload.backward_hooks)


def remove_zero3_hooks(engine, model) -> None:
    """Take ZeRO-3's gather/release hooks off every module (the hybrid engine's generation mode)."""
    offload = zero_offload(engine)
    for p in model.parameters():
        p.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def restore_zero3_hooks(engine) -> None:
    """Put ZeRO-3's hooks back exactly as at engine creation. count=[0] numbers the modules as then (the default
    list keeps counting up); re-registering also invalidates the parameter coordinator's trace, so it re-records
    on the next forward."""
    offload = zero_offload(engine)
    offload._register_deepspeed_module(offload.module, count=[0])


@contextlib.contextmanager
def plain_linear() -> Iterator[None]:
    """torch's own linear for a stretch of work without backward. ZeRO-3 replaces torch.nn.functional.linear,
    process-wide and for good, with an autograd Function that keeps less for backward (`memory_efficient_linear`);
    without a backward that buys nothing, and its separate matmul + add cost 105 us a call against 62 us for the
    fused kernel in bench_ppo's decode steps. Used for rollouts and the experience forwards
    (tests/workers/hybrid_check.py checks that ZeRO-3's linear is back afterwards)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Patcher

    functional = torch.nn.functional
    if functional.linear is not zero3_linear_wrap or not hasattr(Patcher, "linear_bk") or torch.is_grad_enabled():
        yield
        return
    functional.linear = Patcher.linear_bk
    try:
        yield
    finally:
        functional.linear = zero3_linear_wrap


def hybrid_gather_latency(engine) -> float:
    """Seconds DeepSpeed's own hybrid engine spent gathering in its last generate."""
    return getattr(engine, "_gather_latency", 0.0)


def convert_to_universal(input_folder: Path, output_folder: Path) -> None:
    """DeepSpeed's ds_to_universal tool, called in-process (tests/test_resume.py: a universal resumption)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(Namespace(input_folder=str(input_folder), output_folder=str(output_folder),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True))


def checkpoint_allow_list() -> list:
    """The classes besides tensors and containers that DeepSpeed 0.19 pickles into its checkpoint files: its loss
    scalers, the ZeRO stage enum and the (numel, start) record of a flat-buffer fragment (found by reading the pickles' globals; tests/test_resume.py loads every kind
    of checkpoint the tests write through this list)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(where: Path) -> Iterator[None]:
    """Make every torch.load inside (DeepSpeed's checkpoint engine and universal conversion call torch.load with
    weights_only=False) load with weights_only=True and the allow-list above: a checkpoint file never runs code.
    A file that needs anything else is refused with one line."""
    from rlhf_ds.errors import UserError

    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(checkpoint_allow_list()):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            detail = str(err).split("\n")[0][:200]
            raise UserError(f"{f}: holds objects a checkpoint should not ({detail}); it was not loaded, and nothing in "
                            f"it ran. Resume from a checkpoint written by rlhf_ds (under {where})") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def recorded_write_errors(engine, before_write: Callable[[], None] | None = None) -> Iterator[list[OSError]]:
    """While saving `engine`, a failed file write (a full disk) is recorded in the yielded list instead of raised,
    and later writes of that save are skipped. DeepSpeed's save_checkpoint has collectives after its writes: a rank
    that raised between them would leave the other ranks waiting in a barrier forever, where a recorded error lets
    every rank reach the end and agree that the save failed. `before_write` runs before each write (fault
    injection for the tests)."""
    writer = engine.checkpoint_engine
    original = writer.save
    errors: list[OSError] = []

    def save(*args, **kwargs):
        if errors:
            return None
        try:
            if before_write is not None:
                before_write()
            return original(*args, **kwargs)
        except OSError as err:
            errors.append(err)
            return None

    writer.save = save
    try:
        yield errors
    finally:
        writer.save = original


# DeepSpeed JIT-builds its CPU shared-memory all-reduce op at the first distributed start (deepspeed/comm/torch.py,
# build_shm_op) and checks it at every later one, each time under torch's lock file (torch.utils.file_baton: a file
# made with O_EXCL, no owner recorded, waited on without a timeout). A start killed in that window (a preemption, a
# timeout, a node failure) leaves the file behind, and every later start on the machine then waits forever without a
# word. rlhf_ds loads the op itself first, under a kernel lock (flock) that dies with its holder: while we hold it, no
# rlhf_ds process is building, so a torch lock file found then was left by a killed start (or belongs to another
# program's build, which gets BUILD_LOCK_GRACE_S to finish). DeepSpeed's own call then finds the op loaded.
SHM_OP_BUILDER = "ShareMemCommBuilder"
BUILD_LOCK_GRACE_S = 60.0


def guarded_op_build(build_dir: Path, load: Callable[[], object], grace_s: float = BUILD_LOCK_GRACE_S) -> object:
    """Run `load` (which may take torch's lock file in build_dir) under a flock, clearing a lock file left by a killed
    build first. tests/test_faults.py drives it with a stand-in loader; dist.init_distributed with DeepSpeed's."""
    import fcntl
    import logging
    import time

    build_dir.mkdir(parents=True, exist_ok=True)
    torch_lock = build_dir / "lock"
    with open(build_dir / "rlhf_ds_build.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another rlhf_ds start is building: wait for it (freed if it dies)
        waited = False
        while torch_lock.exists():
            try:
                age = time.time() - torch_lock.stat().st_mtime
            except FileNotFoundError:
                break
            if age >= grace_s:
                torch_lock.unlink(missing_ok=True)
                logging.getLogger("rlhf_ds").warning(
                    "removed %s: a DeepSpeed op build killed %.0f s ago had left it, and DeepSpeed would have waited "
                    "for it forever", torch_lock, age)
                break
            if not waited:
                logging.getLogger("rlhf_ds").info("waiting for another program's DeepSpeed op build (%s)", torch_lock)
                waited = True
            time.sleep(0.5)
        return load()


def load_shm_op() -> None:
    """Load DeepSpeed's CPU shared-memory all-reduce op the safe way (above), before DeepSpeed's start asks for it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder(SHM_OP_BUILDER)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed will not build it either: gloo all the way
    guarded_op_build(Path(_get_build_directory(builder.NAME, verbose=False)), lambda: builder.load(verbose=False))


def import_muon_lazily() -> None:
    """Import DeepSpeed's Muon optimizer with its @torch.compile decorators deferred to the first call.

    DeepSpeed imports the module while it builds any ZeRO engine and again in each ZeRO-1/2 gradient reduction (to
    test `isinstance(optimizer, MuonWithAuxAdam)`). Its decorators then call torch.compile at import, which loads
    TorchInductor: 0.7-1.5 s of every rank's start-up on a 2-core CPU, for an optimizer rlhf_ds never builds. Here the
    module is imported once with DeepSpeed's `compiler.compile()` handing back a wrapper that compiles on its first
    call, so a Muon user gets the same compiled kernels and everyone else skips the cost. Covered by
    tests/engines/test_ds_config.py (the module is imported without TorchInductor's compiler)."""
    import sys

    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    import functools

    from deepspeed.runtime import compiler

    def lazily_compiled(fn):
        compiled = None

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = torch.compile(fn)
            return compiled(*args, **kwargs)
        return wrapper

    eager = compiler.compile
    compiler.compile = lambda: lazily_compiled
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  (imports original_muon)
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        compiler.compile = eager
