"""Where a checkpoint is written and read: gathering weights out of ZeRO, the output folder and its finished marker,
atomic publishing, and resumable checkpoints (save, load, the resume plan). Plain exported folders are export.py."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from rlhf_ds import dist
from rlhf_ds.engines.ds_compat import consolidated_state_dict
from rlhf_ds.errors import UserError

logger = logging.getLogger(__name__)


def gather_state_dict(engine, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The engine's full (un-partitioned) state dict on rank 0, None on the other ranks. Collective."""
    module = engine.module
    if engine.zero_optimization_partition_weights():  # ZeRO-3
        if not trainable_only:
            return consolidated_state_dict(engine)
        import deepspeed

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            state = {n: p.detach().cpu().clone() for n, p in named} if dist.is_main() else None
        return state
    if not dist.is_main():
        return None
    state = module.state_dict()
    if trainable_only:
        keep = {n for n, p in module.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in keep}
    return {k: v.detach().cpu() for k, v in state.items()}


RUN_LOGS = ("metrics.jsonl", "samples.jsonl", "eval_results.jsonl", "eval_samples.jsonl")


def check_output_dir(output_dir: str | Path, overwrite: bool, finished_marker: str, keep: bool = False) -> Path:
    """Create --output_dir. --overwrite_output_dir clears it; a finished run there is refused otherwise; a fresh
    start (keep=False) drops the logs a killed earlier run left, so they are not mixed with the new ones."""
    out = Path(output_dir)
    if not str(output_dir):
        raise UserError("--output_dir is required")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    if not keep and not overwrite:
        refuse_finished(out, finished_marker)
    if dist.is_main():
        if overwrite and out.exists():
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        if not keep:
            for name in RUN_LOGS:
                (out / name).unlink(missing_ok=True)
    dist.barrier()
    return out


def refuse_finished(out: Path, finished_marker: str) -> None:
    if (out / finished_marker).exists():
        raise UserError(f"{out} already holds a finished run ({finished_marker}); pass --overwrite_output_dir to "
                        f"replace it, or choose another --output_dir")


def publish_files(write: Callable[[Path], None], dest: Path, marker: str) -> None:
    """Rank 0: write(tmp) fills a temporary folder; its files then move into dest with `marker` moved last,
    so dest holds the marker only when everything else is in place."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / ".incomplete"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != marker] + [n for n in names if n == marker]:
        target = dest / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    tmp.rmdir()


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def save_causal_lm(module, state: dict[str, torch.Tensor], out_dir: Path, tokenizer) -> None:
    """A policy as it trains: a peft adapter folder for LoRA, a full Hugging Face folder otherwise."""
    module.save_pretrained(str(out_dir), state_dict={k: v.contiguous() for k, v in state.items()})
    tokenizer.save_pretrained(str(out_dir))


# ------------------------------------------------------------------------------------------ resumable checkpoints
#
# OUT/checkpoints/step-N/            one resumable checkpoint, written as step-N.tmp and renamed when complete
#     trainer_state.json             step, position in the data, the stage's own state, the run's configuration
#     rng/rank_R.pt                  Python, NumPy, torch (and CUDA) random states of every rank
#     <engine>/state/...             DeepSpeed's own save_checkpoint of each engine that trains
#     model/ (actor/, critic/, ...)  the models as plain folders: export and chat work from any checkpoint
# OUT/checkpoints/latest             the tag of the newest complete checkpoint, replaced last

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
ENGINE_TAG = "state"


def capture_rng() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint under an output folder, a checkpoints folder, or a step folder itself."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    step_dir = root / pointer.read_text().strip()
    return step_dir if (step_dir / STATE_FILE).is_file() else None


def die_if_asked(point: str, step: int) -> None:
    """Fault injection for the tests: RLHF_DS_DIE_AT=step:N kills this process with SIGKILL right after step N,
    save:N in the middle of writing checkpoint N (engines written, folder not yet renamed)."""
    if os.environ.get("RLHF_DS_DIE_AT") == f"{point}:{step}" and dist.is_main():
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def save_resumable(out: Path, step: int, engines: dict, state: dict, write_models: Callable[[Path], None],
                   keep: int | None = None) -> Path:
    """Every rank saves its engines' shards and RNG into OUT/checkpoints/step-N.tmp; rank 0 adds the trainer state
    and the model folders, renames the folder and then points `latest` at it. Collective."""
    root = out / CHECKPOINTS
    tag = f"step-{step}"
    tmp = root / f"{tag}.tmp"
    started = time.perf_counter()
    if dist.is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    for name, engine in engines.items():
        # frozen weights (a LoRA base, a frozen backbone) are reloaded from the model itself: do not copy them
        frozen = any(not p.requires_grad for p in engine.module.parameters())
        engine.save_checkpoint(str(tmp / name), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=frozen)
    rng = capture_rng()
    torch.save(rng, tmp / "rng" / f"rank_{dist.rank()}.pt")
    write_models(tmp)  # collective: gathers the weights; rank 0 writes the folders
    restore_rng(rng)  # building the exported models initialises weights: the run must not see that
    dist.barrier()
    die_if_asked("save", step)
    final = root / tag
    if dist.is_main():
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f"{LATEST}.tmp"
        pointer.write_text(tag)
        os.replace(pointer, root / LATEST)
        if keep:
            _prune(root, keep)
    dist.barrier()
    if dist.is_main():
        size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        logger.info("saved checkpoint %s (%.1f MB, %.1f s)", final, size / 2**20, time.perf_counter() - started)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")),
                   key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_resumable(step_dir: Path, engines: dict, universal: bool = False) -> dict:
    """Load every engine's DeepSpeed checkpoint and this rank's RNG from a checkpoint; return the trainer state."""
    for name, engine in engines.items():
        tag = f"{ENGINE_TAG}_universal" if universal else ENGINE_TAG
        path, _ = engine.load_checkpoint(str(step_dir / name), tag=tag, load_module_strict=False,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"{step_dir / name}: DeepSpeed could not load the {name} engine's checkpoint")
    rng = step_dir / "rng" / f"rank_{dist.rank()}.pt"
    if rng.is_file() and not universal:  # after a change of layout the ranks start their own streams
        restore_rng(torch.load(rng, weights_only=False))
    return json.loads((step_dir / STATE_FILE).read_text())


def truncate_run_logs(out: Path, step: int) -> None:
    """Rank 0: drop the lines of OUT's run logs logged after `step` (a resumed run logs them again)."""
    if not dist.is_main():
        return
    for path in (out / name for name in RUN_LOGS):
        if path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# Settings that may change between a run and its resumption (they do not change what was trained so far).
RESUMABLE_CHANGES = ("num_train_epochs", "max_steps", "learning_rate", "logging_steps", "save_steps",
                     "save_total_limit", "eval_steps", "report_to", "dist_timeout")
TOPOLOGY = ("world_size", "zero_stage", "actor_zero_stage", "critic_zero_stage")


def plan_resume(out: Path, resume: str, overwrite: bool, finished_marker: str, config: dict,
                universal: bool) -> tuple[Path | None, bool]:
    """Before anything is built: start fresh, or resume from which checkpoint. Returns (checkpoint or None,
    whether it needs DeepSpeed's universal conversion). Refuses a checkpoint written with another configuration."""
    if overwrite:
        return None, False
    if resume not in ("auto", ""):
        ckpt = latest_checkpoint(resume)
        if ckpt is None:
            raise UserError(f"--resume {resume}: no complete checkpoint there (a folder with {STATE_FILE}, or an "
                            f"--output_dir / checkpoints folder whose '{LATEST}' points to one)")
    else:
        refuse_finished(out, finished_marker)
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            return None, False
    saved = json.loads((ckpt / STATE_FILE).read_text()).get("config", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in config.items()
             if k not in RESUMABLE_CHANGES and k not in TOPOLOGY and saved.get(k) != v]
    topology = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in config.items()
                if k in TOPOLOGY and saved.get(k) != v]
    if diffs:
        raise UserError(f"{ckpt} was written by a run with another configuration ({'; '.join(diffs)}); pass "
                        f"--overwrite_output_dir to start afresh, or choose another --output_dir")
    if topology and not universal:
        raise UserError(f"{ckpt} was written with {'; '.join(topology)}; pass --universal_checkpoint to convert "
                        f"it (DeepSpeed's universal checkpoint), or resume with the same layout")
    return ckpt, bool(topology)


def convert_to_universal(ckpt: Path, engine_names: list[str]) -> None:
    """Rank 0 converts each engine's checkpoint into DeepSpeed's universal format (once), next to it."""
    if dist.is_main():
        from rlhf_ds.engines.ds_compat import convert_to_universal as ds_to_universal

        for name in engine_names:
            target = ckpt / name / f"{ENGINE_TAG}_universal"
            if target.exists():
                continue
            logger.info("converting %s to a universal checkpoint", ckpt / name)
            ds_to_universal(ckpt / name / ENGINE_TAG, target)
    dist.barrier()
