"""What a run tells its user: log lines, a progress bar, metrics.jsonl, TensorBoard, and plots."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from rlhf_ds import dist

logger = logging.getLogger("rlhf_ds")

METRICS_FILE = "metrics.jsonl"


def setup_logging() -> None:
    """INFO lines from rank 0, warnings and errors from every rank (prefixed with the rank)."""
    from rlhf_ds.models.loading import quiet_transformers

    quiet_transformers()
    rank = dist.rank()
    prefix = "[rlhf_ds]" if dist.world_size() == 1 or rank == 0 else f"[rlhf_ds rank {rank}]"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
    root = logging.getLogger("rlhf_ds")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    return value


class Tracker:
    """Writes one JSON line per log call to OUTPUT/metrics.jsonl (rank 0) and, if asked, TensorBoard scalars."""

    def __init__(self, output_dir: str | Path, report_to: str = "none", logging_dir: str | None = None,
                 purge_step: int | None = None):
        self.enabled = dist.is_main()
        self.path = Path(output_dir) / METRICS_FILE
        self.writer = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events an interrupted one logged after its checkpoint
            self.writer = SummaryWriter(log_dir=logging_dir or str(Path(output_dir) / "runs"), purge_step=purge_step)

    def log(self, metrics: dict[str, Any], step: int, kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": step, **{k: _clean(v) for k, v in metrics.items()}, "time": round(time.time(), 3)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def log_start(self, precision, step: int) -> None:
        """A "run" line each time a process starts (or resumes) the run: the precision that really runs and on
        which processor, so figures from different machines are never compared unlabelled."""
        from rlhf_ds.engines.precision import cpu_description, on_cuda

        if not self.enabled:
            return
        import torch

        device = torch.cuda.get_device_name() if on_cuda() else cpu_description()["model"]
        row = {"kind": "run", "step": step, **precision.record(), "device": device,
               "world_size": dist.world_size(), "time": round(time.time(), 3)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    from rlhf_ds.outputs import read_log_lines

    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        return []
    return [row for row in read_log_lines(p) if kind is None or row.get("kind") == kind]


PROGRESS_SECONDS = float(os.environ.get("RLHF_DS_PROGRESS_SECONDS", "25"))


def progress(total: int, desc: str, disable: bool = False, initial: int = 0, unit: str = "step"):
    """A tqdm bar on a terminal; elsewhere (a pipe, a log file, SLURM, the recipe reading a stage's output) whole
    lines, at least every RLHF_DS_PROGRESS_SECONDS (25) seconds while the work lasts."""
    from tqdm.auto import tqdm

    disable = disable or not dist.is_main()
    if sys.stdout.isatty() or disable:
        return tqdm(total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True, file=sys.stdout,
                    mininterval=0.5)
    return LineProgress(total, desc, initial=initial, unit=unit, interval=PROGRESS_SECONDS)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LineProgress:
    """Progress as whole lines for output that is not a terminal. tqdm redraws with a carriage return and only when
    it is updated, so a pipe read line by line shows nothing while a slow step runs. Here a timer thread writes a
    line (count, rate, time left) whenever `interval` seconds pass without one, however long a step takes."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step", interval: float = 25.0):
        import threading

        self.total, self.desc, self.n, self.first, self.unit = total, desc, initial, initial, unit
        self.interval, self.postfix = interval, ""
        self.started = self.last = time.time()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="rlhf_ds-progress", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._closed.wait(min(1.0, self.interval / 4)):
            if time.time() - self.last >= self.interval:
                self._emit()

    def line(self) -> str:
        now = time.time()
        done = self.n - self.first
        head = f"{self.desc}: {self.n}/{self.total} {self.unit}{'es' if self.unit.endswith('ch') else 's'}"
        parts = [f"{_duration(now - self.started)} elapsed"]
        if done > 0:
            per = (now - self.started) / done
            parts.append(f"{per:.1f} s/{self.unit}" if per >= 1 else f"{1 / per:.2f} {self.unit}s/s")
            if self.n < self.total:
                parts.append(f"about {_duration(per * (self.total - self.n))} left")
        elif self.n < self.total:
            parts.append(f"{self.unit} {self.n + 1} running")
        return f"{head} | {' | '.join(parts)}" + (f" | {self.postfix}" if self.postfix else "")

    def _emit(self) -> None:
        with self._lock:
            sys.stdout.write(self.line() + "\n")
            sys.stdout.flush()
            self.last = time.time()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.time() - self.last >= self.interval:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=2)
        if self.n > self.first:
            self._emit()


def format_metrics(metrics: dict[str, Any], keys: Iterable[str] | None = None) -> str:
    items = metrics.items() if keys is None else ((k, metrics[k]) for k in keys if k in metrics)
    parts = []
    for key, value in items:
        value = _clean(value)
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def plot_metric(rows: list[dict[str, Any]], key: str, out_png: str | Path, title: str | None = None,
                smooth: int = 0) -> Path | None:
    """A line plot of `key` over steps (with a moving average when smooth > 1); None if nothing to plot."""
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(steps, values, alpha=0.4 if smooth > 1 else 1.0, label=key)
    if smooth > 1 and len(values) > smooth:
        avg = [sum(values[max(0, i - smooth + 1): i + 1]) / len(values[max(0, i - smooth + 1): i + 1])
               for i in range(len(values))]
        ax.plot(steps, avg, label=f"{key} (moving average of {smooth})")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
