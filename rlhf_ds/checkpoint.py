"""Resumable checkpoints: written whole or not at all, loaded without running code, pruned without losing what
`latest` names, and the plan for whether a start resumes.

OUT/checkpoints/step-N/            one resumable checkpoint, written as step-N.tmp and renamed when every rank is done
    trainer_state.json             step, position in the data, the trainer's own state, the run's configuration
    rng/rank_R.pt                  Python, NumPy, torch (and CUDA) random states of every rank (tensors and numbers
                                   only: loaded with weights_only=True)
    <engine>/state/...             DeepSpeed's save_checkpoint of each engine that trains (loaded with
                                   weights_only=True and an allow-list of DeepSpeed's two state classes)
    <engine>/ (model files)        the models as plain folders: export and chat work from any checkpoint
    manifest.json                  the sha256 of every file above, written last: a truncated or altered file is
                                   found before anything is loaded
OUT/checkpoints/latest             the tag of the newest complete checkpoint, replaced last

Trust model: loading a checkpoint never unpickles code (weights_only everywhere, an allow-list of data classes),
so a file planted in a shared folder cannot run as the job's owner; the manifest finds truncation and accidental
changes, not a deliberate writer, who could rewrite it too: protect the folder's write permission for that.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from rlhf_ds import dist
from rlhf_ds.engines.ds_compat import recorded_write_errors, weights_only_loads
from rlhf_ds.errors import UserError
from rlhf_ds.faults import die_if_asked, fail_save_if_asked
from rlhf_ds.outputs import fsync_path, fsync_tree, read_marker, refuse_finished, write_atomic

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
ENGINE_TAG = "state"


# ----------------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    """Every random state as tensors and plain numbers, so that it loads with weights_only=True."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"],
                       "gauss": np_state["gauss"]},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                                "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """The files a manifest covers: all but itself and the universal conversions made later from the files (the
    converted folder and the `latest_universal` tag file DeepSpeed writes beside it)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, "latest_universal")
                  and f"{ENGINE_TAG}_universal" not in p.relative_to(folder).parts)


def _hash_shared(folder: Path) -> dict[str, str]:
    """sha256 of every file in `folder`, the files split over the ranks (each reads its share over the shared
    storage), then gathered on every rank. Collective."""
    files = _files(folder)
    mine = {str(p.relative_to(folder)): _sha256(p) for p in files[dist.rank()::dist.world_size()]}
    hashes: dict[str, str] = {}
    for part in dist.all_gather_object(mine):
        hashes.update(part)
    return hashes


def verify_manifest(step_dir: Path) -> None:
    """Refuse a checkpoint whose files are missing, truncated or changed since it was saved. Collective."""
    problem = None
    try:
        recorded = json.loads((step_dir / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        problem = f"{step_dir}: no readable {MANIFEST}; the checkpoint is incomplete or not rlhf_ds's"
        recorded = {}
    problem = dist.first_problem(problem)
    if problem:
        raise UserError(f"{problem}; resume from another one (--resume PATH) or start afresh")
    found = _hash_shared(step_dir)
    wrong = sorted(name for name in recorded if found.get(name) != recorded[name])
    extra = sorted(set(found) - set(recorded))
    if wrong or extra:
        what = (f"{len(wrong)} file(s) differ from when it was saved ({', '.join(wrong[:3])})" if wrong else
                f"{len(extra)} file(s) were added after it was saved ({', '.join(extra[:3])})")
        raise UserError(f"{step_dir}: {what}; it was not loaded. Resume from another checkpoint (--resume PATH) or "
                        f"start afresh (--overwrite_output_dir)")


# ------------------------------------------------------------------------------------------------- where
def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest save first."""
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / STATE_FILE).is_file() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: (p / MANIFEST).stat().st_mtime)


def latest_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint to continue from, under an output folder, a checkpoints folder, or a step folder itself:
    the one `latest` names, or, when `latest` names nothing complete, the newest complete one (said in a line)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / STATE_FILE).is_file() and (named / MANIFEST).is_file():
            return named
    complete = complete_checkpoints(root)
    if complete:
        logger.warning("%s names no complete checkpoint: using the newest complete one, %s", pointer,
                       complete[-1].name)
        return complete[-1]
    return None


def clean_partial_saves(out: Path) -> None:
    """Rank 0: remove the step-N.tmp folders a killed or failed save left (rlhf_ds's own, never complete)."""
    root = out / CHECKPOINTS
    if dist.is_main() and root.is_dir():
        for tmp in root.glob("step-*.tmp"):
            logger.info("removing %s, a save that never completed", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- save
def estimate_bytes(root: Path) -> int:
    complete = complete_checkpoints(root)
    if not complete:
        return 0
    return sum(p.stat().st_size for p in complete[-1].rglob("*") if p.is_file())


def save_resumable(out: Path, step: int, engines: dict, state: dict, write_models: Callable[[Path], None],
                   keep: int | None = None) -> Path | None:
    """Every rank saves its engines' shards and RNG into OUT/checkpoints/step-N.tmp and rank 0 the trainer state
    and the model folders; the files are hashed into the manifest and flushed to disk; only when every rank
    succeeded is the folder renamed and `latest` moved. A failed save (a full disk on any rank) is removed, and
    every rank raises the same one-line error: the previous checkpoint stays `latest`. Collective."""
    root = out / CHECKPOINTS
    tag = f"step-{step}"
    tmp = root / f"{tag}.tmp"
    final = root / tag
    started = time.perf_counter()
    problem = None
    if dist.is_main():
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
            need, free = estimate_bytes(root), shutil.disk_usage(root).free
            if need and free < need * 1.1:
                problem = (f"checkpoint {tag} needs about {need / 2**30:.1f} GiB (the size of the last one) and "
                           f"{root} has {free / 2**30:.1f} GiB free")
        except OSError as err:
            problem = f"rank 0 could not prepare {tmp}: {err}"
    problem = dist.first_problem(problem)
    rng = capture_rng()
    if problem is None:
        failed: list[OSError] = []
        for name, engine in engines.items():
            # frozen weights (a LoRA base, a frozen backbone) are reloaded from the model itself: not copied
            frozen = any(not p.requires_grad for p in engine.module.parameters())
            with recorded_write_errors(engine, lambda: fail_save_if_asked(step)) as errors:
                engine.save_checkpoint(str(tmp / name), tag=ENGINE_TAG, save_latest=False,
                                       exclude_frozen_parameters=frozen)
            failed += errors
        try:
            if not failed:
                torch.save(rng, tmp / "rng" / f"rank_{dist.rank()}.pt")
        except OSError as err:
            failed.append(err)
        if failed:
            problem = f"rank {dist.rank()} could not write {tmp}: {failed[0]}"
    problem = dist.first_problem(problem)
    if problem is None:
        try:
            write_models(tmp)  # collective: gathers the weights; rank 0 writes the folders
        except OSError as err:
            problem = f"rank {dist.rank()} could not write the models into {tmp}: {err}"
        finally:
            restore_rng(rng)  # building the exported models initialises weights: the run must not see that
    problem = dist.first_problem(problem)
    if problem is None:
        try:
            if dist.is_main():
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            dist.barrier()
            hashes = _hash_shared(tmp)
            if dist.is_main():
                (tmp / MANIFEST).write_text(json.dumps({"step": step, "sha256": hashes}, indent=1))
                fsync_tree(tmp)
        except OSError as err:
            problem = f"rank {dist.rank()} could not finish {tmp}: {err}"
    problem = dist.first_problem(problem)
    die_if_asked("save", step)
    if problem is not None:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise UserError(f"checkpoint {tag} was not saved ({problem}); the run stops, and the previous checkpoint "
                        f"stays the one it resumes from. Free some space and run the same command again")
    if dist.is_main():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
        write_atomic(root / LATEST, tag)
        marker = out / ".rlhf_ds"
        if marker.is_file():
            record = read_marker(out) or {}
            record["checkpoint_time"] = int(time.time())
            write_atomic(marker, json.dumps(record, indent=2))
        if keep:
            prune(root, keep)
        size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        logger.info("saved checkpoint %s (%.1f MB, %.1f s)", final, size / 2**20, time.perf_counter() - started)
    dist.barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints by save time, and always the one `latest` names: after a
    resumption from an earlier checkpoint, the abandoned later ones go first, never the run's newest."""
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    complete = complete_checkpoints(root)
    for old in complete[:-keep]:
        if old.name != named:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- load
def load_resumable(step_dir: Path, engines: dict, universal: bool = False) -> dict:
    """Check the manifest, then load every engine's DeepSpeed checkpoint and this rank's RNG, never unpickling
    code; returns the trainer state. Collective."""
    verify_manifest(step_dir)
    with weights_only_loads(step_dir):
        for name, engine in engines.items():
            tag = f"{ENGINE_TAG}_universal" if universal else ENGINE_TAG
            path, _ = engine.load_checkpoint(str(step_dir / name), tag=tag, load_module_strict=False,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise UserError(f"{step_dir / name}: DeepSpeed could not load the {name} engine's checkpoint")
        rng = step_dir / "rng" / f"rank_{dist.rank()}.pt"
        if rng.is_file() and not universal:  # after a change of layout the ranks start their own streams
            restore_rng(torch.load(rng))
    return json.loads((step_dir / STATE_FILE).read_text())


# ------------------------------------------------------------------------------------------------- plan
# Settings that may change between a run and its resumption (they do not change what was trained so far).
RESUMABLE_CHANGES = ("num_train_epochs", "max_steps", "learning_rate", "logging_steps", "save_steps",
                     "save_total_limit", "eval_steps", "report_to", "dist_timeout")
TOPOLOGY = ("world_size", "zero_stage", "actor_zero_stage", "critic_zero_stage")


def plan_resume(out: Path, resume: str, overwrite: bool, finished_marker: str, config: dict,
                universal: bool, requeue: str | None = None) -> tuple[Path | None, bool]:
    """Before anything is built: start fresh, or resume from which checkpoint. Returns (checkpoint or None,
    whether it needs DeepSpeed's universal conversion). Refuses a checkpoint written with another configuration.
    `requeue` (why this start continues the same job) turns --overwrite_output_dir into a resumption when the
    job already wrote a checkpoint: a requeued job must not delete the checkpoint it should resume from."""
    if overwrite:
        ckpt = latest_checkpoint(out) if requeue else None
        if ckpt is None:
            return None, False
        logger.info("--overwrite_output_dir not applied: %s, and it saved %s; resuming from it", requeue, ckpt.name)
    elif resume not in ("auto", ""):
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
        hint = " (--precision sets it explicitly)" if any(d.startswith("precision:") for d in diffs) else ""
        raise UserError(f"{ckpt} was written by a run with another configuration ({'; '.join(diffs)}){hint}; pass "
                        f"--overwrite_output_dir to start afresh, or choose another --output_dir")
    if topology and not universal:
        raise UserError(f"{ckpt} was written with {'; '.join(topology)}; pass --universal_checkpoint to convert "
                        f"it (DeepSpeed's universal checkpoint), or resume with the same layout")
    return ckpt, bool(topology)


def convert_to_universal(ckpt: Path, engine_names: list[str]) -> None:
    """Rank 0 converts each engine's checkpoint into DeepSpeed's universal format (once), next to it."""
    verify_manifest(ckpt)
    if dist.is_main():
        from rlhf_ds.engines.ds_compat import convert_to_universal as ds_to_universal

        for name in engine_names:
            target = ckpt / name / f"{ENGINE_TAG}_universal"
            if target.exists():
                continue
            logger.info("converting %s to a universal checkpoint", ckpt / name)
            with weights_only_loads(ckpt):
                ds_to_universal(ckpt / name / ENGINE_TAG, target)
    dist.barrier()
