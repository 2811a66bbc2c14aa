"""What a run tells its user: log lines, a progress bar, metrics.jsonl, TensorBoard, and plots."""
from __future__ import annotations

import json
import logging
import math
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    rows = []
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if kind is None or row.get("kind") == kind:
                rows.append(row)
    return rows


def progress(total: int, desc: str, disable: bool = False, initial: int = 0):
    from tqdm.auto import tqdm

    # Without a terminal (a log file, CI, SLURM) redraw rarely: each redraw is a line of its own there.
    interactive = sys.stdout.isatty()
    return tqdm(total=total, desc=desc, initial=initial, disable=disable or not dist.is_main(),
                dynamic_ncols=True, file=sys.stdout, mininterval=0.5 if interactive else 30.0)


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
