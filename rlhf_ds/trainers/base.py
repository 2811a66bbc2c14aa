"""The recipe the supervised stages share (SFT, reward model): setup -> train -> evaluate -> save -> cleanup.

A stage says what its data is (`kind`, `tokenize`, `make_collator`), what model it trains (`build_model`), how a
batch becomes a loss (`compute_loss`), how it evaluates (`evaluate`) and how its model is written (`write_model`).
The training loop itself is `StageTrainer.train`, in one place.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from rlhf_ds import dist
from rlhf_ds.args import (DEFAULT_MAX_LENGTH, DataArguments, FinetuningArguments, ModelArguments, RuntimeArguments,
                          TrainingArguments, to_dict)
from rlhf_ds.checkpoint import (check_output_dir, convert_to_universal, die_if_asked, load_resumable, plan_resume,
                                publish_files, save_resumable, truncate_run_logs)
from rlhf_ds.data.collate import train_sampler
from rlhf_ds.data.loading import DataReport, load_examples, split_eval
from rlhf_ds.data.template import resolve_template
from rlhf_ds.engines.ds_config import EngineSettings, engine_config
from rlhf_ds.engines.precision import run_precision
from rlhf_ds.engines.factory import create_train_engine
from rlhf_ds.errors import Preempted, UserError
from rlhf_ds.models.finetuning import count_parameters
from rlhf_ds.models.loading import load_tokenizer, resolve_model_path
from rlhf_ds.tracking import Tracker, format_metrics, plot_metric, progress, read_metrics, setup_logging

logger = logging.getLogger("rlhf_ds")


@dataclass
class LoopState:
    """Where the training loop is: everything a checkpoint needs to continue it exactly."""

    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches done
    epoch: int = 0
    position: int = 0  # micro-batches done in this epoch
    sums: dict[str, float] = field(default_factory=dict)  # the metrics window since the last log line
    window_n: int = 0
    losses: list[float] = field(default_factory=list)  # every logged loss, for train_loss
    runtime: float = 0.0  # seconds of training before this process


@dataclass
class StageTrainer:
    model_args: ModelArguments
    data_args: DataArguments
    ft_args: FinetuningArguments
    args: TrainingArguments
    rt: RuntimeArguments
    report: DataReport = field(default_factory=DataReport)
    metrics: dict[str, Any] = field(default_factory=dict)

    name: ClassVar[str] = "stage"  # progress bar and messages
    kind: ClassVar[str] = "sft"  # what load_examples produces for this stage
    unit: ClassVar[str] = "examples"  # what one row of a batch is
    finished_marker: ClassVar[str] = "train_results.json"  # written last: its presence means "finished"
    log_keys: ClassVar[tuple[str, ...]] = ("loss",)

    # ------------------------------------------------------------------------------------- stage-specific
    def tokenize(self, examples, name: str):
        raise NotImplementedError

    def make_collator(self):
        raise NotImplementedError

    def loader_columns(self) -> list[str]:
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def gather_model(self) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def write_model(self, folder: Path, state: dict[str, torch.Tensor], final: bool) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        args, rt, d = self.args, self.rt, self.data_args
        dist.init_distributed(rt.dist_timeout)
        setup_logging()
        from transformers import set_seed

        set_seed(args.seed)
        if not args.do_train:
            raise UserError(f"the {self.name} stage needs --do_train")
        if not d.dataset:
            raise UserError("--dataset is required (a registered name such as alpaca_gpt4_zh, or a file)")
        if args.do_eval and not (d.val_size or d.eval_dataset):
            raise UserError("--do_eval needs held-out data: give --val_size (e.g. 0.1) or --eval_dataset")
        self.prec = run_precision(rt, self.model_args.model_name_or_path)
        self.precision = self.prec.name
        logger.info("%s: %s", self.name, self.prec.describe())
        self.resume_from, self.universal = plan_resume(Path(args.output_dir), args.resume,
                                                       args.overwrite_output_dir, self.finished_marker,
                                                       self.resume_config(), args.universal_checkpoint)
        self.out = check_output_dir(args.output_dir, args.overwrite_output_dir, self.finished_marker,
                                    keep=self.resume_from is not None)
        if dist.is_main():
            (self.out / "training_args.json").write_text(json.dumps(
                {**to_dict(self.model_args, d, self.ft_args, args, rt), **self.prec.record()}, indent=2,
                ensure_ascii=False))
        self.max_length = d.max_length or DEFAULT_MAX_LENGTH
        with dist.main_process_first():  # rank 0 converts a built-in model and fills the data caches first
            self.model_path = resolve_model_path(self.model_args.model_name_or_path)
            self.tokenizer = load_tokenizer(self.model_path, padding_side="right")
            self.template = resolve_template(self.tokenizer, self.model_args.template)
            self._setup_data()
        settings = EngineSettings(
            micro_batch=args.per_device_train_batch_size, grad_accum=args.gradient_accumulation_steps,
            precision=self.precision, max_grad_norm=args.max_grad_norm, lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay,
            stage=rt.zero_stage, world_size=dist.world_size(),
            persistence_threshold=rt.stage3_param_persistence_threshold)
        self.ds_config = engine_config(settings, trainable=True, offload=rt.offload, user_config=rt.deepspeed)
        if self.universal:
            self.ds_config["checkpoint"] = {"load_universal": True}
            convert_to_universal(self.resume_from, ["engine"])
        self._setup_schedule()
        model = self.build_model()
        trainable, total = count_parameters(model)
        logger.info("model %s: %s of %s parameters train (%s); ZeRO-%d, %s, %d rank(s)",
                    self.model_args.model_name_or_path, f"{trainable:,}", f"{total:,}", self.ft_args.finetuning_type,
                    self.ds_config["zero_optimization"]["stage"], self.precision, dist.world_size())
        self.engine = create_train_engine(model, self.ds_config, scheduler_type=args.lr_scheduler_type,
                                          warmup_steps=self.warmup_steps, total_steps=self.total_steps)
        torch.manual_seed(args.seed + dist.rank())  # same initial weights everywhere, different dropout per rank
        self.loop = LoopState()
        if self.resume_from is not None:
            self._resume()
        self.tracker = Tracker(self.out, args.report_to, args.logging_dir, purge_step=self.loop.step + 1)
        self.tracker.log_start(self.prec, self.loop.step)
        self.stop = dist.StopSignal()

    def resume_config(self) -> dict[str, Any]:
        """What a checkpoint must have been written with to continue it (see checkpoint.plan_resume)."""
        a, d, f = self.args, self.data_args, self.ft_args
        return {"stage": self.name, "model": self.model_args.model_name_or_path, "template": self.model_args.template,
                "finetuning_type": f.finetuning_type, "lora_rank": f.lora_rank, "lora_target": f.lora_target,
                "dataset": d.dataset, "eval_dataset": d.eval_dataset, "val_size": d.val_size,
                "max_samples": d.max_samples, "max_length": d.max_length, "seed": a.seed,
                "per_device_train_batch_size": a.per_device_train_batch_size,
                "gradient_accumulation_steps": a.gradient_accumulation_steps, "group_by_length": a.group_by_length,
                "precision": self.precision, "world_size": dist.world_size(), "zero_stage": self.rt.zero_stage}

    def _resume(self) -> None:
        state = load_resumable(self.resume_from, {"engine": self.engine}, self.universal)
        self.loop = LoopState(**state["loop"])
        if self.universal:  # the same number of examples seen, in the new layout's order
            seen = state["loop"]["position"] * state["rows_per_micro"]
            self.loop.position = seen // (self.args.per_device_train_batch_size * dist.world_size())
        truncate_run_logs(self.out, self.loop.step)
        logger.info("resuming from %s: step %d of %d, epoch %d", self.resume_from, self.loop.step,
                    self.total_steps, self.loop.epoch)

    def _setup_data(self) -> None:
        d = self.data_args
        load = dict(dataset_dir=d.dataset_dir, dataset_format=d.dataset_format, max_samples=d.max_samples,
                    keep_ties=d.keep_ties, report=self.report)
        examples = load_examples(d.dataset, self.kind, **load)
        if d.eval_dataset:
            train, evaluation = examples, load_examples(d.eval_dataset, self.kind, **load)
        elif d.val_size:
            train, evaluation = split_eval(examples, d.val_size, self.args.seed)
        else:
            train, evaluation = examples, None
        self.train_set = self.tokenize(train, "train")
        self.eval_set = self.tokenize(evaluation, "eval") if evaluation is not None else None
        self.report.add(f"{len(self.train_set)} training {self.unit}" +
                        (f", {len(self.eval_set)} evaluation {self.unit}" if self.eval_set is not None else ""))
        self.collator = self.make_collator()

    def _setup_schedule(self) -> None:
        args = self.args
        world = dist.world_size()
        self.sampler = train_sampler(self.train_set, args.per_device_train_batch_size, dist.rank(), world,
                                     args.seed, args.group_by_length)
        # The loader gets a generator of its own: creating an iterator would otherwise draw from the global RNG,
        # and a resumed run (which restores that RNG) would then see different dropout than an uninterrupted one.
        self.loader = DataLoader(self.train_set.select_columns(self.loader_columns()),
                                 batch_size=args.per_device_train_batch_size, sampler=self.sampler,
                                 collate_fn=self.collator, drop_last=True,
                                 generator=torch.Generator().manual_seed(args.seed))
        self.micro_per_epoch = len(self.loader)
        per_step = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
        if args.max_steps > 0:
            self.total_steps = args.max_steps
        else:
            self.total_steps = int(args.num_train_epochs * self.micro_per_epoch) // args.gradient_accumulation_steps
        if self.micro_per_epoch == 0 or self.total_steps < 1:
            raise UserError(f"{len(self.train_set)} training {self.unit} are too few for one optimizer step of "
                            f"{per_step} (batch {args.per_device_train_batch_size} x {world} ranks x accumulation "
                            f"{args.gradient_accumulation_steps} over {args.num_train_epochs} epochs); lower the "
                            f"batch size or accumulation, or use more data")
        self.warmup_steps = args.warmup_steps or math.ceil(args.warmup_ratio * self.total_steps)
        logger.info("%d optimizer steps of %d %s (%d micro-batches per epoch)", self.total_steps, per_step,
                    self.unit, self.micro_per_epoch)

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        args, engine, loop = self.args, self.engine, self.loop
        device = dist.device()
        ga = args.gradient_accumulation_steps
        total_micro = self.total_steps * ga
        rows_since_log, t_log, t_start = 0, time.time(), time.time()
        bar = progress(self.total_steps, self.name, disable=self.rt.disable_tqdm, initial=loop.step)
        engine.train()
        while loop.micro < total_micro:
            self.sampler.set_epoch(loop.epoch)
            for batch in itertools.islice(self.loader, loop.position, None):  # a resumed epoch skips what was done
                if loop.micro >= total_micro:
                    break
                loss, values = self.compute_loss({k: v.to(device) for k, v in batch.items()})
                engine.backward(loss)
                engine.step()
                loop.micro += 1
                loop.position += 1
                for key, value in {"loss": loss.item(), **values}.items():
                    loop.sums[key] = loop.sums.get(key, 0.0) + value
                loop.window_n += 1
                rows_since_log += args.per_device_train_batch_size * dist.world_size()
                if loop.micro % ga:
                    continue
                loop.step += 1
                bar.update(1)
                if loop.step % args.logging_steps == 0 or loop.step == self.total_steps:
                    keys = sorted(loop.sums)
                    means = dist.all_reduce_mean(torch.tensor([loop.sums[k] / loop.window_n for k in keys],
                                                              dtype=torch.float64))
                    now = time.time()
                    row = dict(zip(keys, means.tolist()))
                    row.update(learning_rate=engine.get_lr()[0], epoch=loop.micro / self.micro_per_epoch,
                               samples_per_second=rows_since_log / (now - t_log))
                    loop.losses.append(row["loss"])
                    self.tracker.log(row, loop.step)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    logger.info("step %d/%d %s", loop.step, self.total_steps, format_metrics(
                        row, (*self.log_keys, "learning_rate", "epoch", "samples_per_second")))
                    loop.sums, loop.window_n, rows_since_log, t_log = {}, 0, 0, now
                stop = self.stop.requested()
                if stop or (args.save_steps and loop.step % args.save_steps == 0 and loop.step < self.total_steps):
                    loop.runtime += time.time() - t_start
                    t_start = time.time()
                    self.save_checkpoint(loop.step)
                die_if_asked("step", loop.step)
                if stop:
                    bar.close()
                    raise Preempted(f"{self.stop.describe()} received: checkpoint saved at step {loop.step} in "
                                    f"{self.out}")
            if loop.micro < total_micro or loop.position >= self.micro_per_epoch:
                loop.epoch += 1
                loop.position = 0
        bar.close()
        loop.runtime += time.time() - t_start
        runtime = loop.runtime
        self.metrics.update(train_runtime=runtime, train_steps=loop.step,
                            train_loss=sum(loop.losses) / max(len(loop.losses), 1),
                            train_samples_per_second=total_micro * args.per_device_train_batch_size
                            * dist.world_size() / max(runtime, 1e-9))
        logger.info("trained %d steps in %.1f s", loop.step, runtime)

    # ------------------------------------------------------------------------------------------------- save
    def save_checkpoint(self, step: int) -> None:
        """A resumable checkpoint OUT/checkpoints/step-N: the engine's DeepSpeed state, the loop, the RNG, and the
        model as a plain folder (model/)."""
        def write_models(folder: Path) -> None:
            state = self.gather_model()
            if dist.is_main():
                self.write_model(folder / "model", state, final=False)

        trainer_state = {"loop": asdict(self.loop), "config": self.resume_config(),
                         "rows_per_micro": self.args.per_device_train_batch_size * dist.world_size(),
                         "total_steps": self.total_steps}
        save_resumable(self.out, step, {"engine": self.engine}, trainer_state, write_models,
                       self.args.save_total_limit)

    def save(self) -> None:
        """The final model and results into --output_dir; the finished marker arrives last."""
        state = self.gather_model()
        if dist.is_main():
            def write(tmp: Path) -> None:
                self.write_model(tmp, state, final=True)
                for prefix, name in (("eval_", "eval_results.json"), ("train_", "train_results.json")):
                    values = {k: v for k, v in self.metrics.items() if k.startswith((prefix, f"init_{prefix}"))}
                    if values:
                        (tmp / name).write_text(json.dumps(values, indent=2))

            publish_files(write, self.out, marker=self.finished_marker)
            if self.args.plot_loss:
                png = plot_metric(read_metrics(self.out, "train"), "loss", self.out / "training_loss.png",
                                  f"{self.name}: training loss", smooth=5)
                if png:
                    logger.info("wrote %s", png)
            logger.info("%s saved to %s", self.name, self.out)
        dist.barrier()

    def cleanup(self) -> None:
        self.tracker.close()

    def run(self) -> int:
        self.setup()
        if self.args.do_eval and self.args.eval_before_train:
            before = self.evaluate()
            self.metrics.update({f"init_{k}": v for k, v in before.items()})
        self.train()
        if self.args.do_eval:
            self.evaluate()
        self.save()
        self.cleanup()
        return 0
