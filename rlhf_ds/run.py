"""A run's life, owned once for every trainer: the process group and seed, the precision, the output folder and its
"finished" marker, the resume plan and its settings check, training_args.json, the trackers, stop signals, the
end-of-step stop/save decision, periodic checkpoints and the final atomic publish.

A trainer (trainers/base.py) holds one Run and calls it at fixed points; nothing here knows what is trained.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from rlhf_ds import dist
from rlhf_ds.args import RuntimeArguments, TrainingArguments
from rlhf_ds.checkpoint import (clean_partial_saves, convert_to_universal, load_resumable, plan_resume,
                                save_resumable)
from rlhf_ds.faults import die_if_asked
from rlhf_ds.engines.precision import Precision, run_precision
from rlhf_ds.errors import Preempted
from rlhf_ds.outputs import claim, is_requeue, publish_files, start_fresh, truncate_run_logs
from rlhf_ds.tracking import Tracker, setup_logging

logger = logging.getLogger("rlhf_ds")


class Run:
    def __init__(self, name: str, args: TrainingArguments, rt: RuntimeArguments, finished_marker: str):
        self.name, self.args, self.rt, self.finished_marker = name, args, rt, finished_marker
        self.stop = dist.StopSignal()  # first: a SIGTERM / SIGUSR1 from now on is honoured, not fatal
        self.out = Path(args.output_dir)
        self.resume_from: Path | None = None
        self.universal = False
        self.tracker: Tracker | None = None
        self.lock = None
        self.precision: Precision | None = None
        self._started = time.time()

    # --------------------------------------------------------------------------------------------- start
    def start(self, model: str | None = None) -> Precision:
        """Process group, logging, seed; the precision this run computes in (one start-up line says why)."""
        dist.init_distributed(self.rt.dist_timeout)
        setup_logging()
        from transformers import set_seed

        set_seed(self.args.seed)
        self.precision = run_precision(self.rt, model)
        logger.info("%s: %s", self.name, self.precision.describe())
        return self.precision

    def open_output(self, resume_config: dict[str, Any], flags: dict[str, Any]) -> None:
        """Lock --output_dir, decide between a fresh start and a resumption (refusing a checkpoint written with
        other settings, and never letting --overwrite_output_dir delete what a requeued job should resume from),
        prepare the folder, and record every flag and the precision in training_args.json."""
        args = self.args
        self.lock, foreign = claim(self.out, self.name)
        requeue = is_requeue(self.out)
        self.resume_from, self.universal = plan_resume(self.out, args.resume, args.overwrite_output_dir,
                                                       self.finished_marker, resume_config,
                                                       args.universal_checkpoint, requeue)
        if self.resume_from is None:
            start_fresh(self.out, args.overwrite_output_dir, self.finished_marker, foreign)
        clean_partial_saves(self.out)
        if dist.is_main():
            record = {**flags, **self.precision.record()}
            (self.out / "training_args.json").write_text(json.dumps(record, indent=2, ensure_ascii=False,
                                                                    default=str))
        dist.barrier()

    def universal_engines(self, ds_configs: dict[str, dict], names: list[str]) -> None:
        """When resuming on another layout: convert the checkpoint once and tell these engines to load it."""
        if self.universal:
            for name in names:
                ds_configs[name]["checkpoint"] = {"load_universal": True}
            convert_to_universal(self.resume_from, names)

    def load_checkpoint(self, engines: dict) -> dict[str, Any]:
        """Every engine's DeepSpeed state and this rank's RNG; returns the trainer state saved beside them."""
        state = load_resumable(self.resume_from, engines, self.universal)
        truncate_run_logs(self.out, state["loop"]["step"])
        return state

    def open_tracker(self, step: int) -> Tracker:
        self.tracker = Tracker(self.out, self.args.report_to, self.args.logging_dir, purge_step=step + 1)
        self.tracker.log_start(self.precision, step)
        return self.tracker

    # ------------------------------------------------------------------------------------------- the loop
    def end_of_step(self, step: int, total_steps: int, save: Callable[[int], None]) -> None:
        """After every optimizer step, on every rank: a periodic checkpoint when one is due; on a stop signal
        (any rank's) a checkpoint, then Preempted, which the CLI turns into exit code 75."""
        stop = self.stop.requested()
        periodic = self.args.save_steps and step % self.args.save_steps == 0 and step < total_steps
        if stop or periodic:
            save(step)
        die_if_asked("step", step)
        if stop:
            raise Preempted(f"{self.stop.describe()} received: checkpoint saved at step {step} in {self.out}")

    def save_checkpoint(self, step: int, engines: dict, state: dict[str, Any],
                        write_models: Callable[[Path], None]) -> Path:
        return save_resumable(self.out, step, engines, state, write_models, self.args.save_total_limit)

    # -------------------------------------------------------------------------------------------- the end
    def publish(self, write: Callable[[Path], None]) -> None:
        """Rank 0: the final files into --output_dir through a temporary folder, the finished marker last."""
        if dist.is_main():
            publish_files(write, self.out, marker=self.finished_marker)
        dist.barrier()

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
