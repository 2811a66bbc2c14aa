"""The life every trainer shares: setup -> train -> save -> cleanup, with the training loop in one place.

A trainer supplies only what differs about it (see the hooks below): its data, its engines, one optimizer step
(`train_step`), its evaluation, the state it saves and how its models are written. Starting, resuming, logging,
stop signals, periodic checkpoints and the final publish are `Trainer` and `rlhf_ds.run.Run`, once.

    trainers/supervised.py   batches of examples or pairs and one loss: SFT, the reward model, DPO
    trainers/online/         a rollout per step (the actor generates): PPO, GRPO, RLOO, REINFORCE++
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from rlhf_ds import dist
from rlhf_ds.flag_parsing import to_dict
from rlhf_ds.checkpoint import capture_rng, restore_rng
from rlhf_ds.data.loading import DataReport
from rlhf_ds.errors import Preempted, UserError
from rlhf_ds.faults import signal_if_asked
from rlhf_ds.run import Run
from rlhf_ds.tracking import format_metrics, progress

logger = logging.getLogger("rlhf_ds")


class StepAbandoned(Exception):
    """Raised by a trainer at a safe point of its step (nothing trained yet) when a stop was asked for: the step
    is undone and the checkpoint is written at once, instead of after the rest of the step."""


@dataclass
class LoopState:
    """Where the training loop is: everything a checkpoint needs to continue it exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # loader items consumed in this epoch
    sums: dict[str, float] = field(default_factory=dict)  # the metrics window since the last log line
    window_n: int = 0
    losses: list[float] = field(default_factory=list)  # every logged loss, for train_loss
    runtime: float = 0.0  # seconds of training before this process


class Trainer:
    name: ClassVar[str] = "stage"  # progress bar and messages
    finished_marker: ClassVar[str] = "train_results.json"  # written last: its presence means "finished"
    log_keys: ClassVar[tuple[str, ...]] = ("loss",)  # what the console line shows
    log_every_step: ClassVar[bool] = False  # metrics.jsonl: a line per step (else per --logging_steps window)
    summed_metrics: ClassVar[frozenset[str]] = frozenset()  # train_step figures summed over ranks (else averaged)

    def __init__(self, model_args, data_args, ft_args, args, rt, *extra):
        self.model_args, self.data_args, self.ft_args, self.args, self.rt = model_args, data_args, ft_args, args, rt
        self.extra_args = extra
        self.report = DataReport()
        self.metrics: dict[str, Any] = {}  # evaluation and training results for the final files

    # --------------------------------------------------------------------------------- what a trainer supplies
    def check_flags(self) -> None:
        """Refuse flag combinations this trainer cannot run, before anything heavy."""

    def resume_config(self) -> dict[str, Any]:
        """What a checkpoint must have been written with to continue it (see checkpoint.plan_resume)."""
        a, d, f = self.args, self.data_args, self.ft_args
        return {"stage": self.name, "model": self.model_args.model_name_or_path, "template": self.model_args.template,
                "finetuning_type": f.finetuning_type, "lora_rank": f.lora_rank, "lora_target": f.lora_target,
                "dataset": d.dataset, "eval_dataset": d.eval_dataset, "val_size": d.val_size,
                "max_samples": d.max_samples, "seed": a.seed, "precision": self.precision.name,
                "per_device_train_batch_size": a.per_device_train_batch_size,
                "gradient_accumulation_steps": a.gradient_accumulation_steps, "world_size": dist.world_size()}

    def setup_data(self) -> None:
        """Tokenised self.train_set (and self.eval_set or None); runs on rank 0 first (caches)."""
        raise NotImplementedError

    def make_loader(self) -> tuple[Any, Any, int, int]:
        """(loader, sampler, loader items per optimizer step, rows of data per item on this rank)."""
        raise NotImplementedError

    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (for the learning-rate schedule)."""
        return self.total_steps

    def build_engines(self) -> None:
        raise NotImplementedError

    def checkpoint_engines(self) -> dict[str, Any]:
        """The engines whose DeepSpeed state a checkpoint holds (those that train)."""
        raise NotImplementedError

    def train_step(self, items: list) -> dict[str, float]:
        """One optimizer step on `items` (loader items); returns this rank's figures."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What else a checkpoint must restore (KL controller, reward statistics, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def gather_models(self) -> Any:
        """Collective: the weights to write, gathered out of ZeRO (on rank 0)."""
        raise NotImplementedError

    def write_models(self, folder: Path, gathered: Any, final: bool) -> None:
        """Rank 0: the models as plain folders into `folder` (a checkpoint's, or the final output)."""
        raise NotImplementedError

    def write_results(self, folder: Path) -> None:
        """Rank 0: the final results files (train_results.json is the default finished marker)."""
        results = {k: v for k, v in self.metrics.items() if k.startswith(("train_",))}
        for prefix, name in (("eval_", "eval_results.json"),):
            values = {k: v for k, v in self.metrics.items() if k.startswith((prefix, f"init_{prefix}"))}
            if values:
                (folder / name).write_text(json.dumps(values, indent=2))
        (folder / "train_results.json").write_text(json.dumps(results, indent=2))

    # ------------------------------------------------------------------------------------------------- setup
    def flag_groups(self) -> tuple:
        return (self.model_args, self.data_args, self.ft_args, self.args, self.rt, *self.extra_args)

    def setup(self) -> None:
        args = self.args
        self.run_ = Run(self.name, args, self.rt, self.finished_marker)
        self.precision = self.run_.start(self.model_args.model_name_or_path)
        if not args.do_train:
            raise UserError(f"the {self.name} stage needs --do_train")
        if not self.data_args.dataset:
            raise UserError("--dataset is required (a registered name such as alpaca_gpt4_zh, or a file)")
        if args.do_eval and not (self.data_args.val_size or self.data_args.eval_dataset):
            raise UserError("--do_eval needs held-out data: give --val_size (e.g. 0.1) or --eval_dataset")
        self.check_flags()
        self.run_.open_output(self.resume_config(), to_dict(*self.flag_groups()))
        self.out = self.run_.out
        with dist.main_process_first():  # rank 0 converts a built-in model and fills the data caches first
            self.setup_data()
        self._setup_schedule()
        self.build_engines()
        signal_if_asked("setup", 0)
        self.loop = LoopState()
        if self.run_.resume_from is not None:
            self._resume()
        self.tracker = self.run_.open_tracker(self.loop.step)

    def _setup_schedule(self) -> None:
        args = self.args
        self.loader, self.sampler, self.items_per_step, rows_per_item = self.make_loader()
        self.rows_per_item = rows_per_item * dist.world_size()
        self.items_per_epoch = len(self.loader)
        if args.max_steps > 0:
            self.total_steps = args.max_steps
        else:
            self.total_steps = int(args.num_train_epochs * self.items_per_epoch) // self.items_per_step
        if self.items_per_epoch == 0 or self.total_steps < 1:
            per_step = self.rows_per_item * self.items_per_step
            raise UserError(f"{len(self.train_set)} training {self.unit} are too few for one optimizer step of "
                            f"{per_step} (batch {args.per_device_train_batch_size} x {dist.world_size()} ranks x "
                            f"accumulation {args.gradient_accumulation_steps} over {args.num_train_epochs} epochs); "
                            f"lower the batch size or accumulation, or use more data")
        self.warmup_steps = args.warmup_steps or math.ceil(args.warmup_ratio * self.optimizer_steps())
        logger.info("%d optimizer steps of %d %s (%d loader items per epoch)", self.total_steps,
                    self.rows_per_item * self.items_per_step, self.unit, self.items_per_epoch)

    unit: ClassVar[str] = "examples"

    def _resume(self) -> None:
        state = self.run_.load_checkpoint(self.checkpoint_engines())
        self.loop = LoopState(**state["loop"])
        if self.run_.universal:  # the same number of examples seen, in the new layout's order
            self.loop.position = self.loop.position * state["rows_per_item"] // self.rows_per_item
        self.load_state_dict(state)
        logger.info("resuming from %s: step %d of %d, epoch %d", self.run_.resume_from, self.loop.step,
                    self.total_steps, self.loop.epoch)

    # ------------------------------------------------------------------------------------------------- train
    def _items(self) -> Iterator[Any]:
        """Loader items from where the loop stands, epoch after epoch (a resumed epoch skips what was done)."""
        loop = self.loop
        while True:
            self.sampler.set_epoch(loop.epoch)
            for item in itertools.islice(self.loader, loop.position, None):
                loop.position += 1
                yield item
            loop.epoch += 1
            loop.position = 0

    def train(self) -> None:
        args, loop = self.args, self.loop
        if self.run_.stop.requested():  # a stop asked for during set-up: nothing new to save
            raise Preempted(f"{self.run_.stop.describe()} received during set-up, before step {loop.step + 1}; "
                            f"nothing new to save in {self.out}")
        if self.eval_set is not None and args.eval_before_train and loop.step == 0:
            before = self.evaluate(0)
            self.metrics.update({f"init_{k}": v for k, v in before.items() if k.startswith("eval_")})
        bar = progress(self.total_steps, self.name, disable=self.rt.disable_tqdm, initial=loop.step)
        items = self._items()
        t_start = t_log = time.time()
        steps_since_log = 0
        while loop.step < self.total_steps:
            before = (copy.deepcopy(asdict(loop)), capture_rng(), copy.deepcopy(self.state_dict()))
            batch = list(itertools.islice(items, self.items_per_step))
            t0 = time.time()
            try:
                figures = self.train_step(batch)
            except StepAbandoned:
                bar.close()
                self._abandon(before)
            loop.step += 1
            steps_since_log += 1
            step = loop.step
            row = self._reduce(figures)
            row["time_step"] = time.time() - t0
            row.update(self.derived_figures(row))
            for key, value in row.items():
                loop.sums[key] = loop.sums.get(key, 0.0) + value
            loop.window_n += 1
            bar.update(1)
            due = step % args.logging_steps == 0 or step == self.total_steps
            if self.log_every_step or due:
                now = time.time()
                logged = {k: v / loop.window_n for k, v in loop.sums.items()}
                logged.update(self.step_context(step))
                logged["samples_per_second"] = self.rows_per_item * self.items_per_step * steps_since_log / max(
                    now - t_log, 1e-9)
                if "loss" in logged:
                    loop.losses.append(logged["loss"])
                self.tracker.log(logged, step)
                bar.set_postfix(**{k: f"{logged[k]:.4g}" for k in self.log_keys[:2] if k in logged})
                if due or step == 1:
                    logger.info("step %d/%d %s", step, self.total_steps, format_metrics(logged, self.log_keys))
                    self.log_line(step, logged)
                loop.sums, loop.window_n, steps_since_log, t_log = {}, 0, 0, now
            if self.eval_set is not None and args.eval_steps and step % args.eval_steps == 0 \
                    and step < self.total_steps:
                self.evaluate(step)
            loop.runtime += time.time() - t_start
            t_start = time.time()
            try:
                self.run_.end_of_step(step, self.total_steps, self.save_checkpoint)
            except BaseException:
                bar.close()
                raise
            t_start = time.time()
            reason = self.stop_early(row)
            if reason:
                logger.warning("stopping at step %d of %d: %s", step, self.total_steps, reason)
                self.metrics["train_stopped_early"] = reason
                break
        bar.close()
        self.metrics.update(train_runtime=loop.runtime, train_steps=loop.step,
                            train_samples_per_second=loop.step * self.items_per_step * self.rows_per_item
                            / max(loop.runtime, 1e-9))
        if loop.losses:
            self.metrics["train_loss"] = sum(loop.losses) / len(loop.losses)
        logger.info("trained %d steps in %.1f s", loop.step, loop.runtime)
        if self.eval_set is not None:
            self.evaluate(loop.step)

    def stop_point(self) -> None:
        """A safe point inside a step (before anything is trained): stop there if a stop was asked for."""
        if self.run_.stop.requested():
            raise StepAbandoned()

    def _abandon(self, before) -> None:
        """Undo the started step (where the data and the random streams stood, the trainer's state) and save the
        checkpoint of the last finished step now."""
        loop_state, rng, state = before
        for key, value in loop_state.items():
            setattr(self.loop, key, value)
        restore_rng(rng)
        self.load_state_dict(state)
        logger.info("%s received during step %d: the step is left undone%s", self.run_.stop.describe(),
                    self.loop.step + 1, f" and step {self.loop.step} is saved now" if self.loop.step else "")
        if self.loop.step:
            self.save_checkpoint(self.loop.step)
        raise Preempted(f"{self.run_.stop.describe()} received: checkpoint saved at step {self.loop.step} in "
                        f"{self.out}")

    def _reduce(self, figures: dict[str, float]) -> dict[str, float]:
        """This rank's figures -> the whole run's: means over ranks, sums for `summed_metrics`."""
        keys = sorted(figures)
        values = dist.all_reduce_sum(torch.tensor([float(figures[k]) for k in keys], dtype=torch.float64))
        world = dist.world_size()
        return {k: v if k in self.summed_metrics else v / world for k, v in zip(keys, values.tolist())}

    def step_context(self, step: int) -> dict[str, float]:
        """Figures logged with every metrics line besides train_step's (learning rates, epoch)."""
        loop = self.loop
        return {"epoch": loop.epoch + loop.position / max(self.items_per_epoch, 1)}

    def stop_early(self, row: dict[str, float]) -> str | None:
        """Why the run should end now rather than at --max_steps (a trainer's guard), or None."""
        return None

    def derived_figures(self, row: dict[str, float]) -> dict[str, float]:
        """Figures computed from a step's reduced ones (rates, shares)."""
        return {}

    def log_line(self, step: int, row: dict[str, float]) -> None:
        """A second console line for a logged step, where a trainer has one (PPO's timing line)."""

    # -------------------------------------------------------------------------------------------------- save
    def save_checkpoint(self, step: int) -> None:
        """A resumable checkpoint OUT/checkpoints/step-N: the training engines' DeepSpeed state, the loop, the
        trainer's own state, the RNG, and the models as plain folders beside them."""
        def write(folder: Path) -> None:
            gathered = self.gather_models()
            if dist.is_main():
                self.write_models(folder, gathered, final=False)

        state = {"loop": asdict(self.loop), "config": self.resume_config(), "rows_per_item": self.rows_per_item,
                 "total_steps": self.total_steps, **self.state_dict()}
        self.run_.save_checkpoint(step, self.checkpoint_engines(), state, write)

    def save(self) -> None:
        """The final models and results into --output_dir; the finished marker arrives last."""
        gathered = self.gather_models()

        def write(tmp: Path) -> None:
            self.write_models(tmp, gathered, final=True)
            self.write_results(tmp)

        self.run_.publish(write)
        logger.info("%s saved to %s", self.name, self.out)

    def cleanup(self) -> None:
        self.run_.close()

    def run(self) -> int:
        self.setup()
        self.train()
        self.save()
        self.cleanup()
        return 0
