"""Trainers whose step is batches of data through one DeepSpeed engine and one loss: SFT, the reward model, DPO.

A subclass says what its data is (`kind`, `tokenize`, `make_collator`, `loader_columns`), what model it trains
(`build_model`), how a batch becomes a loss (`compute_loss`), how it evaluates and how its model is written.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from rlhf_ds import dist
from rlhf_ds.args import DEFAULT_MAX_LENGTH
from rlhf_ds.data.collate import train_sampler
from rlhf_ds.data.loading import load_examples, split_eval
from rlhf_ds.data.template import resolve_template
from rlhf_ds.engines.ds_config import EngineSettings, engine_config
from rlhf_ds.engines.factory import create_train_engine
from rlhf_ds.models.finetuning import count_parameters
from rlhf_ds.models.loading import load_tokenizer, resolve_model_path
from rlhf_ds.trainers.base import Trainer

logger = logging.getLogger("rlhf_ds")


class SupervisedTrainer(Trainer):
    kind: ClassVar[str] = "sft"  # what load_examples produces for this stage: "sft" or "preference"

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

    def augment(self, examples):
        """Training examples a stage adds to the data it was given (none by default)."""
        return examples

    def tokenizer_source(self) -> Path:
        return self.model_path

    # ------------------------------------------------------------------------------------------ the hooks
    def resume_config(self) -> dict[str, Any]:
        return {**super().resume_config(), "max_length": self.data_args.max_length,
                "group_by_length": self.args.group_by_length, "zero_stage": self.rt.zero_stage}

    def setup_data(self) -> None:
        d = self.data_args
        self.max_length = d.max_length or DEFAULT_MAX_LENGTH
        self.model_path = resolve_model_path(self.model_args.model_name_or_path)
        self.tokenizer = load_tokenizer(self.tokenizer_source(), padding_side="right")
        self.template = resolve_template(self.tokenizer, self.model_args.template)
        load = dict(dataset_dir=d.dataset_dir, dataset_format=d.dataset_format, max_samples=d.max_samples,
                    keep_ties=d.keep_ties, report=self.report, max_answers_per_record=d.max_answers_per_record)
        examples = load_examples(d.dataset, self.kind, **load)
        if d.eval_dataset:
            evaluation = load_examples(d.eval_dataset, self.kind, **{**load, "max_samples": d.eval_samples()})
            train = examples
        elif d.val_size:
            train, evaluation = split_eval(examples, d.val_size, self.args.seed)
        else:
            train, evaluation = examples, None
        self.train_set = self.tokenize(self.augment(train), "train")
        self.eval_set = self.tokenize(evaluation, "eval") if evaluation is not None and self.args.do_eval else None
        self.report.add(f"{len(self.train_set)} training {self.unit}" +
                        (f", {len(self.eval_set)} evaluation {self.unit}" if self.eval_set is not None else ""))
        self.collator = self.make_collator()

    def make_loader(self):
        args = self.args
        sampler = train_sampler(self.train_set, args.per_device_train_batch_size, dist.rank(), dist.world_size(),
                                args.seed, args.group_by_length)
        # The loader gets a generator of its own: creating an iterator would otherwise draw from the global RNG,
        # and a resumed run (which restores that RNG) would then see different dropout than an uninterrupted one.
        loader = DataLoader(self.train_set.select_columns(self.loader_columns()),
                            batch_size=args.per_device_train_batch_size, sampler=sampler, collate_fn=self.collator,
                            drop_last=True, generator=torch.Generator().manual_seed(args.seed))
        return loader, sampler, args.gradient_accumulation_steps, args.per_device_train_batch_size

    def engine_settings(self) -> EngineSettings:
        args, rt = self.args, self.rt
        return EngineSettings(
            micro_batch=args.per_device_train_batch_size, grad_accum=args.gradient_accumulation_steps,
            precision=self.precision.name, max_grad_norm=args.max_grad_norm, lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.weight_decay,
            stage=rt.zero_stage, world_size=dist.world_size(),
            persistence_threshold=rt.stage3_param_persistence_threshold)

    def build_engines(self) -> None:
        args = self.args
        self.ds_config = engine_config(self.engine_settings(), trainable=True, offload=self.rt.offload,
                                       user_config=self.rt.deepspeed)
        configs = {"engine": self.ds_config}
        self.run_.universal_engines(configs, ["engine"])
        model = self.build_model()
        trainable, total = count_parameters(model)
        logger.info("model %s: %s of %s parameters train (%s); ZeRO-%d, %s, %d rank(s)",
                    self.model_args.model_name_or_path, f"{trainable:,}", f"{total:,}", self.ft_args.finetuning_type,
                    self.ds_config["zero_optimization"]["stage"], self.precision.name, dist.world_size())
        self.engine = create_train_engine(model, self.ds_config, scheduler_type=args.lr_scheduler_type,
                                          warmup_steps=self.warmup_steps, total_steps=self.total_steps)
        torch.manual_seed(args.seed + dist.rank())  # same initial weights everywhere, different dropout per rank
        self.engine.train()

    def checkpoint_engines(self) -> dict[str, Any]:
        return {"engine": self.engine}

    def train_step(self, items: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Forward and backward each micro-batch; DeepSpeed steps the optimizer after the last one."""
        device = dist.device()
        sums: dict[str, float] = {}
        for batch in items:
            loss, values = self.compute_loss({k: v.to(device) for k, v in batch.items()})
            self.engine.backward(loss)
            self.engine.step()
            for key, value in {"loss": loss.item(), **values}.items():
                sums[key] = sums.get(key, 0.0) + value
        return {k: v / len(items) for k, v in sums.items()}

    def save(self) -> None:
        super().save()
        if self.args.plot_loss and dist.is_main():
            from rlhf_ds.tracking import plot_metric, read_metrics

            png = plot_metric(read_metrics(self.out, "train"), "loss", self.out / "training_loss.png",
                              f"{self.name}: training loss", smooth=5)
            if png:
                logger.info("wrote %s", png)

    def step_context(self, step: int) -> dict[str, float]:
        return {"learning_rate": self.engine.get_lr()[0], **super().step_context(step)}
