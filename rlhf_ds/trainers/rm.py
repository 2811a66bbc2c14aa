"""Reward-model stage: learn a scalar score from ranked answer pairs with -log sigmoid(r_chosen - r_rejected).

Recipe: setup() -> train() -> evaluate() -> save() -> cleanup(). `score_pairs` and `pair_metrics` are also used by
launch/eval_rm.py, so the scores at the end of training and a later evaluation come from the same code.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import rlhf_ds
from rlhf_ds import dist
from rlhf_ds.algo.losses import pairwise_loss
from rlhf_ds.algo.sequence import gather_last
from rlhf_ds.args import (DEFAULT_MAX_LENGTH, DataArguments, FinetuningArguments, ModelArguments, RuntimeArguments,
                          TrainingArguments, parse_args, to_dict)
from rlhf_ds.checkpoint import check_output_dir, gather_state_dict, publish_dir, publish_files
from rlhf_ds.data.collate import PairCollator, even_shards, train_sampler
from rlhf_ds.data.loading import DataReport, load_examples, split_eval, tokenize_preference
from rlhf_ds.data.template import resolve_template
from rlhf_ds.engines.ds_config import EngineSettings, dtype_of, engine_config, resolve_precision
from rlhf_ds.engines.factory import create_train_engine
from rlhf_ds.errors import UserError
from rlhf_ds.models.finetuning import apply_finetuning, count_parameters
from rlhf_ds.models.heads import HEAD_META, ScalarHeadModel, is_lora, save_scalar_model
from rlhf_ds.models.loading import load_backbone, load_tokenizer, resolve_model_path
from rlhf_ds.tracking import Tracker, format_metrics, plot_metric, progress, read_metrics, setup_logging

logger = logging.getLogger("rlhf_ds.rm")

SCORE_STATS_SAMPLES = 512  # pairs scored for the mean/std stored with the model when there is no eval split


# ------------------------------------------------------------------------------------------ scoring (shared)


@torch.no_grad()
def score_pairs(engine, dataset, batch_size: int, collator: PairCollator, desc: str = "scoring",
                disable_tqdm: bool = False) -> tuple[list[float], list[float]]:
    """Scores of every pair's chosen and rejected answer, in dataset order, identical on every rank."""
    was_training = engine.training
    engine.eval()
    device = dist.device()
    batches = even_shards(len(dataset), dist.rank(), dist.world_size(), batch_size)
    found: dict[int, tuple[float, float]] = {}
    bar = progress(len(batches), desc, disable=disable_tqdm)
    for indices, n_real in batches:
        batch = collator([dataset[i] for i in indices])
        values = engine(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        scores = gather_last(values, batch["attention_mask"].to(device)).float().cpu()
        chosen, rejected = scores.chunk(2)
        for k in range(n_real):
            found[indices[k]] = (chosen[k].item(), rejected[k].item())
        bar.update(1)
    bar.close()
    for part in dist.all_gather_object(found):
        found.update(part)
    if was_training:
        engine.train()
    ordered = [found[i] for i in range(len(dataset))]
    return [c for c, _ in ordered], [r for _, r in ordered]


def pair_metrics(chosen: list[float], rejected: list[float], chosen_text: list[str],
                 rejected_text: list[str], prefix: str = "eval_") -> dict[str, float]:
    """RM accuracy beside the accuracy of "the longer answer wins" on the same pairs, loss and score stats."""
    c = torch.tensor(chosen, dtype=torch.float64)
    r = torch.tensor(rejected, dtype=torch.float64)
    longer = [1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0
              for a, b in zip(chosen_text, rejected_text)]
    both = torch.cat([c, r])
    return {
        f"{prefix}accuracy": (c > r).double().mean().item(),
        f"{prefix}length_baseline_accuracy": sum(longer) / len(longer),
        f"{prefix}loss": pairwise_loss(c, r).item(),
        f"{prefix}samples": len(chosen),
        f"{prefix}score_mean": both.mean().item(),
        f"{prefix}score_std": both.std().item() if len(both) > 1 else 0.0,
        f"{prefix}chosen_score_mean": c.mean().item(),
        f"{prefix}rejected_score_mean": r.mean().item(),
    }


def write_predictions(path: Path, dataset, chosen: list[float], rejected: list[float]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, (c, r) in enumerate(zip(chosen, rejected)):
            ex = dataset[i]
            f.write(json.dumps({"index": i, "prompt": ex["prompt"], "chosen": ex["chosen"],
                                "rejected": ex["rejected"], "chosen_score": c, "rejected_score": r},
                               ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------- the recipe


@dataclass
class RewardTrainer:
    model_args: ModelArguments
    data_args: DataArguments
    ft_args: FinetuningArguments
    args: TrainingArguments
    rt: RuntimeArguments
    report: DataReport = field(default_factory=DataReport)
    metrics: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        args, rt = self.args, self.rt
        dist.init_distributed(rt.dist_timeout)
        setup_logging()
        from transformers import set_seed

        set_seed(args.seed)
        if not args.do_train:
            raise UserError("train_rm.py needs --do_train; to score a finished reward model use launch/eval_rm.py")
        if not self.data_args.dataset:
            raise UserError("--dataset is required (e.g. --dataset comparison_gpt4_zh)")
        if args.do_eval and not (self.data_args.val_size or self.data_args.eval_dataset):
            raise UserError("--do_eval needs held-out data: give --val_size (e.g. 0.1) or --eval_dataset")
        self.out = check_output_dir(args.output_dir, args.overwrite_output_dir, HEAD_META)
        if dist.is_main():
            (self.out / "training_args.json").write_text(json.dumps(
                to_dict(self.model_args, self.data_args, self.ft_args, args, rt), indent=2, ensure_ascii=False))
        self.precision = resolve_precision(rt.bf16, rt.fp16)
        self.max_length = self.data_args.max_length or DEFAULT_MAX_LENGTH

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
        self._setup_schedule()

        backbone = load_backbone(self.model_path, dtype_of(self.precision), self.ds_config)
        if self.model_args.gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        backbone = apply_finetuning(backbone, self.ft_args)
        model = ScalarHeadModel(backbone)
        trainable, total = count_parameters(model)
        logger.info("model %s (%s): %s of %s parameters train (%s); ZeRO-%d, %s, %d rank(s)",
                    self.model_args.model_name_or_path, type(backbone).__name__, f"{trainable:,}", f"{total:,}",
                    self.ft_args.finetuning_type, self.ds_config["zero_optimization"]["stage"], self.precision,
                    dist.world_size())
        self.engine = create_train_engine(model, self.ds_config, scheduler_type=args.lr_scheduler_type,
                                          warmup_steps=self.warmup_steps, total_steps=self.total_steps)
        torch.manual_seed(args.seed + dist.rank())  # same initial weights everywhere, different dropout per rank
        self.tracker = Tracker(self.out, args.report_to, args.logging_dir)

    def _setup_data(self) -> None:
        d = self.data_args
        examples = load_examples(d.dataset, "preference", d.dataset_dir, d.dataset_format, d.max_samples,
                                 d.keep_ties, self.report)
        if d.eval_dataset:
            train, evaluation = examples, load_examples(d.eval_dataset, "preference", d.dataset_dir,
                                                        d.dataset_format, d.max_samples, d.keep_ties, self.report)
        elif d.val_size:
            train, evaluation = split_eval(examples, d.val_size, self.args.seed)
        else:
            train, evaluation = examples, None
        self.train_set = tokenize_preference(train, self.tokenizer, self.template, self.max_length, self.report)
        self.eval_set = (tokenize_preference(evaluation, self.tokenizer, self.template, self.max_length, self.report,
                                             name="eval") if evaluation is not None else None)
        self.report.add(f"{len(self.train_set)} training pairs" +
                        (f", {len(self.eval_set)} evaluation pairs" if self.eval_set is not None else ""))
        self.collator = PairCollator(self.tokenizer.pad_token_id, self.tokenizer.padding_side)

    def _setup_schedule(self) -> None:
        args = self.args
        world = dist.world_size()
        self.sampler = train_sampler(self.train_set, args.per_device_train_batch_size, dist.rank(), world,
                                     args.seed, args.group_by_length)
        self.loader = DataLoader(self.train_set.select_columns(["chosen_ids", "rejected_ids"]),
                                 batch_size=args.per_device_train_batch_size, sampler=self.sampler,
                                 collate_fn=self.collator, drop_last=True)
        self.micro_per_epoch = len(self.loader)
        per_step = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
        if args.max_steps > 0:
            self.total_steps = args.max_steps
        else:
            self.total_steps = int(args.num_train_epochs * self.micro_per_epoch) // args.gradient_accumulation_steps
        if self.micro_per_epoch == 0 or self.total_steps < 1:
            raise UserError(f"{len(self.train_set)} training pairs are too few for one optimizer step of {per_step} "
                            f"pairs (batch {args.per_device_train_batch_size} x {world} ranks x accumulation "
                            f"{args.gradient_accumulation_steps} over {args.num_train_epochs} epochs); lower the "
                            f"batch size or accumulation, or use more data")
        self.warmup_steps = args.warmup_steps or math.ceil(args.warmup_ratio * self.total_steps)
        logger.info("%d optimizer steps of %d pairs (%d micro-batches per epoch)", self.total_steps, per_step,
                    self.micro_per_epoch)

    # ---------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        args, engine = self.args, self.engine
        device = dist.device()
        ga = args.gradient_accumulation_steps
        total_micro = self.total_steps * ga
        window = torch.zeros(4, dtype=torch.float64)  # loss, accuracy, chosen score, rejected score (sums)
        window_n = 0
        step = micro = 0
        pairs_since_log, t_log, t_start = 0, time.time(), time.time()
        losses: list[float] = []
        bar = progress(self.total_steps, "reward model", disable=self.rt.disable_tqdm)
        engine.train()
        epoch = 0
        while micro < total_micro:
            self.sampler.set_epoch(epoch)
            for batch in self.loader:
                if micro >= total_micro:
                    break
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                scores = gather_last(engine(input_ids=ids, attention_mask=mask), mask)
                chosen, rejected = scores.chunk(2)
                loss = pairwise_loss(chosen, rejected)
                engine.backward(loss)
                engine.step()
                micro += 1
                window += torch.tensor([loss.item(), (chosen > rejected).float().mean().item(),
                                        chosen.mean().item(), rejected.mean().item()], dtype=torch.float64)
                window_n += 1
                pairs_since_log += chosen.numel() * dist.world_size()
                if micro % ga:
                    continue
                step += 1
                bar.update(1)
                if step % args.logging_steps == 0 or step == self.total_steps:
                    mean = dist.all_reduce_mean(window / window_n)
                    now = time.time()
                    row = {"loss": mean[0].item(), "accuracy": mean[1].item(), "chosen_score": mean[2].item(),
                           "rejected_score": mean[3].item(), "learning_rate": engine.get_lr()[0],
                           "epoch": micro / self.micro_per_epoch, "samples_per_second": pairs_since_log / (now - t_log)}
                    losses.append(row["loss"])
                    self.tracker.log(row, step)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}")
                    logger.info("step %d/%d %s", step, self.total_steps, format_metrics(
                        row, ("loss", "accuracy", "chosen_score", "rejected_score", "learning_rate", "epoch",
                              "samples_per_second")))
                    window.zero_()
                    window_n = 0
                    pairs_since_log, t_log = 0, now
                if args.save_steps and step % args.save_steps == 0 and step < self.total_steps:
                    self.save_checkpoint(step)
            epoch += 1
        bar.close()
        runtime = time.time() - t_start
        self.metrics.update(train_runtime=runtime, train_steps=step, train_loss=sum(losses) / max(len(losses), 1),
                            train_samples_per_second=total_micro * args.per_device_train_batch_size
                            * dist.world_size() / runtime)
        logger.info("trained %d steps in %.1f s", step, runtime)

    # ------------------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict[str, float]:
        chosen, rejected = score_pairs(self.engine, self.eval_set, self.rt.per_device_eval_batch_size,
                                       self.collator, desc="evaluating", disable_tqdm=self.rt.disable_tqdm)
        results = pair_metrics(chosen, rejected, self.eval_set["chosen"], self.eval_set["rejected"])
        self.metrics.update(results)
        if dist.is_main():
            write_predictions(self.out / "eval_predictions.jsonl", self.eval_set, chosen, rejected)
        self.tracker.log(results, self.metrics.get("train_steps", 0), kind="eval")
        logger.info("eval: accuracy %.4f (length-only baseline %.4f) loss %.4f on %d pairs; scores mean %.4f "
                    "std %.4f", results["eval_accuracy"], results["eval_length_baseline_accuracy"],
                    results["eval_loss"], results["eval_samples"], results["eval_score_mean"],
                    results["eval_score_std"])
        return results

    def _score_stats(self) -> tuple[float, float, str]:
        if "eval_score_mean" in self.metrics:
            return self.metrics["eval_score_mean"], self.metrics["eval_score_std"], "eval split"
        subset = self.train_set.select(range(min(SCORE_STATS_SAMPLES, len(self.train_set))))
        chosen, rejected = score_pairs(self.engine, subset, self.rt.per_device_eval_batch_size, self.collator,
                                       desc="score statistics", disable_tqdm=self.rt.disable_tqdm)
        stats = pair_metrics(chosen, rejected, subset["chosen"], subset["rejected"], prefix="")
        return stats["score_mean"], stats["score_std"], f"first {len(subset)} training pairs"

    # ----------------------------------------------------------------------------------------------- save
    def _meta(self, score_stats: tuple[float, float, str] | None) -> dict[str, Any]:
        name = self.model_args.model_name_or_path
        base = str(Path(name).resolve()) if Path(name).expanduser().is_dir() else name
        meta = {"kind": "reward", "base_model": base, "finetuning_type": self.ft_args.finetuning_type,
                "template": self.template, "max_length": self.max_length, "precision": self.precision,
                "rlhf_ds_version": rlhf_ds.__version__}
        if score_stats is not None:
            meta.update(score_mean=score_stats[0], score_std=score_stats[1], score_stats_from=score_stats[2])
        return meta

    def _gather(self) -> dict[str, torch.Tensor] | None:
        return gather_state_dict(self.engine, trainable_only=is_lora(self.engine.module))

    def save_checkpoint(self, step: int) -> None:
        """An intermediate model folder OUTPUT/checkpoint-STEP, published whole or not at all."""
        state = self._gather()
        if dist.is_main():
            dest = self.out / f"checkpoint-{step}"
            publish_dir(lambda tmp: save_scalar_model(self.engine.module, state, tmp, self._meta(None),
                                                      self.tokenizer), dest)
            logger.info("saved %s", dest)
        dist.barrier()

    def save(self) -> None:
        stats = self._score_stats()
        state = self._gather()
        if dist.is_main():
            publish_files(lambda tmp: save_scalar_model(self.engine.module, state, tmp, self._meta(stats),
                                                        self.tokenizer), self.out, marker=HEAD_META)
            train_keys = {k: v for k, v in self.metrics.items() if k.startswith("train_")}
            (self.out / "train_results.json").write_text(json.dumps(train_keys, indent=2))
            eval_keys = {k: v for k, v in self.metrics.items() if k.startswith("eval_")}
            if eval_keys:
                (self.out / "eval_results.json").write_text(json.dumps(eval_keys, indent=2))
            if self.args.plot_loss:
                png = plot_metric(read_metrics(self.out, "train"), "loss", self.out / "training_loss.png",
                                  "reward model: training loss", smooth=5)
                if png:
                    logger.info("wrote %s", png)
            logger.info("reward model saved to %s", self.out)
        dist.barrier()

    def cleanup(self) -> None:
        self.tracker.close()


def main(argv: list[str] | None = None) -> int:
    groups = parse_args(ModelArguments, DataArguments, FinetuningArguments, TrainingArguments, RuntimeArguments,
                        argv=argv)
    trainer = RewardTrainer(*groups)
    trainer.setup()
    trainer.train()
    if trainer.args.do_eval:
        trainer.evaluate()
    trainer.save()
    trainer.cleanup()
    return 0


# ------------------------------------------------------------------------------------- evaluating a saved RM


@dataclass
class RewardEvalArguments:
    reward_model: str = field(default="", metadata={"help": "A folder written by train_rm.py."})
    output_file: str | None = field(default=None, metadata={"help": "Where the results JSON goes (default "
                                                                    "REWARD_MODEL/eval_<dataset>.json)."})
    predictions_file: str | None = field(default=None, metadata={"help": "Also write every pair's scores "
                                                                         "(JSON Lines)."})


def evaluate_main(argv: list[str] | None = None) -> int:
    """launch/eval_rm.py: score every pair of a preference dataset with a saved reward model."""
    from rlhf_ds.engines.factory import create_inference_engine
    from rlhf_ds.models.heads import load_scalar_model, read_head_meta

    ev, data_args, rt = parse_args(RewardEvalArguments, DataArguments, RuntimeArguments, argv=argv)
    dist.init_distributed(rt.dist_timeout)
    setup_logging()
    if not ev.reward_model:
        raise UserError("--reward_model is required: the --output_dir of a train_rm.py run")
    if not data_args.dataset:
        raise UserError("--dataset is required: a registered name or a preference file")
    model_dir = Path(ev.reward_model)
    meta = read_head_meta(model_dir)
    precision = resolve_precision(rt.bf16, rt.fp16) if (rt.bf16 or rt.fp16) else meta.get("precision", "fp32")
    max_length = data_args.max_length or meta.get("max_length", DEFAULT_MAX_LENGTH)
    settings = EngineSettings(micro_batch=rt.per_device_eval_batch_size, precision=precision, stage=rt.zero_stage,
                              world_size=dist.world_size(),
                              persistence_threshold=rt.stage3_param_persistence_threshold)
    ds_config = engine_config(settings, trainable=False, offload=rt.offload)
    report = DataReport()
    with dist.main_process_first():
        tokenizer = load_tokenizer(model_dir, padding_side="right")
        examples = load_examples(data_args.dataset, "preference", data_args.dataset_dir, data_args.dataset_format,
                                 data_args.max_samples, data_args.keep_ties, report)
        dataset = tokenize_preference(examples, tokenizer, meta["template"], max_length, report, name="eval")
    model, _ = load_scalar_model(model_dir, dtype_of(precision), ds_config)
    engine = create_inference_engine(model, ds_config)
    collator = PairCollator(tokenizer.pad_token_id, tokenizer.padding_side)
    chosen, rejected = score_pairs(engine, dataset, rt.per_device_eval_batch_size, collator, desc="scoring",
                                   disable_tqdm=rt.disable_tqdm)
    results = pair_metrics(chosen, rejected, dataset["chosen"], dataset["rejected"])
    if dist.is_main():
        slug = "".join(ch if ch.isalnum() else "_" for ch in Path(data_args.dataset).stem)
        out = Path(ev.output_file) if ev.output_file else model_dir / f"eval_{slug}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        if ev.predictions_file:
            write_predictions(Path(ev.predictions_file), dataset, chosen, rejected)
        logger.info("accuracy %.4f (length-only baseline %.4f) loss %.4f on %d pairs -> %s",
                    results["eval_accuracy"], results["eval_length_baseline_accuracy"], results["eval_loss"],
                    results["eval_samples"], out)
    return 0
