"""The output folder of a run: whose it is, who is using it, and how its files are published and repaired.

  .rlhf_ds        written when rlhf_ds creates (or first uses) the folder: the stage, the time, the job. Only a
                  folder that holds it is ever cleared by --overwrite_output_dir, and then only of what rlhf_ds
                  writes there (OWN): a folder a user points at by mistake (`--output_dir .`) is never emptied.
  .rlhf_ds.lock   an exclusive lock (POSIX record lock, which NFS honours) held by rank 0 for the whole run, with
                  the holder's host and pid: a second run on the same folder stops at once and names it. The kernel
                  releases it when the holder dies, so a lock left by a killed run never blocks.
"""
from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from rlhf_ds import dist
from rlhf_ds.errors import UserError

logger = logging.getLogger("rlhf_ds")

MARKER = ".rlhf_ds"
LOCK = ".rlhf_ds.lock"
RUN_LOGS = ("metrics.jsonl", "samples.jsonl", "eval_results.jsonl", "eval_samples.jsonl")
# What rlhf_ds writes at the top of an output folder; --overwrite_output_dir removes these and nothing else.
OWN = ("checkpoints", "runs", ".incomplete", MARKER, "*.json", "*.jsonl", "*.png", "*.safetensors", "*.bin",
       "*.jinja", "*.model", "README.md", "merges.txt", "vocab.*", "actor", "actor_*", "critic", "model")


def current_job() -> str | None:
    """The scheduler's id for this job (SLURM), kept across requeues; RLHF_DS_JOB_ID may name one elsewhere."""
    return os.environ.get("RLHF_DS_JOB_ID") or os.environ.get("SLURM_JOB_ID")


def restart_count() -> int:
    """How many times the scheduler or launcher has restarted this same job (SLURM requeue, torchrun elastic)."""
    for name in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        try:
            if int(os.environ.get(name, "0")) > 0:
                return int(os.environ[name])
        except ValueError:
            continue
    return 0


def read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_requeue(out: Path) -> str | None:
    """Why this start continues an earlier start of the same job (then --overwrite_output_dir must not delete its
    checkpoints), or None."""
    count = restart_count()
    if count:
        return f"this job was restarted (restart {count})"
    marker, job = read_marker(out), current_job()
    if marker and job and marker.get("job") == job:
        return f"job {job} started this folder earlier"
    start = os.environ.get("SLURM_JOB_START_TIME")
    if start and start.isdigit() and marker and marker.get("checkpoint_time", 0) >= int(start):
        return "a checkpoint was written after this job started"
    return None


class FolderLock:
    """Rank 0's exclusive lock on the output folder."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another run ({holder}); wait for it to end, stop it, "
                            f"or choose another --output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%F %T')}".encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (removing it would race a new holder)
            self.fd = None


def _own(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in OWN)


def clear_own(out: Path) -> list[str]:
    """Remove what rlhf_ds wrote into `out` (a folder holding its marker); returns the names left alone."""
    left = []
    for child in out.iterdir():
        if child.name == LOCK:
            continue
        if _own(child.name):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        else:
            left.append(child.name)
    return left


def claim(out: Path, stage: str) -> tuple[FolderLock | None, bool]:
    """Create --output_dir and lock it (rank 0). Returns the lock and whether the folder is foreign: it already held
    files but no marker, so rlhf_ds never marks it as its own and --overwrite_output_dir will not touch it.
    Collective: a problem on rank 0 stops every rank with the same line."""
    if not str(out):
        raise UserError("--output_dir is required")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    lock, foreign, problem = None, False, None
    if dist.is_main():
        try:
            foreign = out.is_dir() and read_marker(out) is None and any(c.name != LOCK for c in out.iterdir())
            out.mkdir(parents=True, exist_ok=True)
            lock = FolderLock(out)
            lock.acquire()
            if not foreign:
                marker = read_marker(out) or {"stage": stage, "created": time.strftime("%F %T")}
                marker.update(job=current_job(), last_start=time.strftime("%F %T"))
                write_atomic(out / MARKER, json.dumps(marker, indent=2))
        except (UserError, OSError) as err:
            problem = str(err)
    problem = dist.first_problem(problem)
    if problem:
        if lock is not None:
            lock.release()
        raise UserError(problem)
    foreign = bool(dist.all_gather_object(foreign)[0])
    return lock, foreign


def start_fresh(out: Path, overwrite: bool, finished_marker: str, foreign: bool) -> None:
    """A run that does not resume: --overwrite_output_dir clears what rlhf_ds wrote (only in its own folders);
    without it a finished run is refused; the logs a killed earlier run left are dropped. Collective."""
    if not overwrite:
        refuse_finished(out, finished_marker)
    problem = None
    if dist.is_main():
        if overwrite and foreign:
            problem = (f"--overwrite_output_dir: {out} held files rlhf_ds did not write (it has no {MARKER}), so "
                       f"nothing was deleted; choose an empty or new --output_dir")
        elif overwrite:
            marker = read_marker(out) or {}
            marker.pop("checkpoint_time", None)
            left = clear_own(out)
            if left:
                logger.info("--overwrite_output_dir: kept %s in %s (not written by rlhf_ds)", ", ".join(left), out)
            write_atomic(out / MARKER, json.dumps(marker, indent=2))
        if problem is None:
            for name in RUN_LOGS:
                (out / name).unlink(missing_ok=True)
    problem = dist.first_problem(problem)
    if problem:
        raise UserError(problem)


def refuse_finished(out: Path, finished_marker: str) -> None:
    if (out / finished_marker).exists():
        raise UserError(f"{out} already holds a finished run ({finished_marker}); pass --overwrite_output_dir to "
                        f"replace it, or choose another --output_dir")


# ------------------------------------------------------------------------------------------ durable writes
def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file() or path.is_dir():
            fsync_path(path)
    fsync_path(root)


def write_atomic(path: Path, text: str) -> None:
    """Write a small file through a temporary name, flushed, then renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def publish_files(write: Callable[[Path], None], dest: Path, marker: str) -> None:
    """Rank 0: write(tmp) fills a temporary folder, flushed to disk; its files then move into dest with `marker`
    moved last, so dest holds the marker only when everything else is in place."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / ".incomplete"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    fsync_tree(tmp)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != marker] + [n for n in names if n == marker]:
        target = dest / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    tmp.rmdir()
    fsync_path(dest)


# ------------------------------------------------------------------------------------------ run logs
def read_log_lines(path: Path) -> list[dict]:
    """The JSON lines of a run log; a torn line (a crash mid-write, a full disk) is dropped, with a warning."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            logger.warning("%s: line %d is not complete JSON (a write was cut short): dropped", path, number)
    return rows


def truncate_run_logs(out: Path, step: int) -> None:
    """Rank 0: keep the lines of OUT's run logs up to `step` (a resumed run logs the later ones again), dropping
    torn lines instead of failing."""
    if not dist.is_main():
        return
    for path in (out / name for name in RUN_LOGS):
        if path.is_file():
            kept = [row for row in read_log_lines(path) if row.get("step", 0) <= step]
            write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
