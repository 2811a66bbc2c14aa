"""Reward-model stage: learn a scalar score from ranked answer pairs with -log sigmoid(r_chosen - r_rejected).

The life of the run is trainers/base.py and its step trainers/supervised.py; this file says what is particular to
the reward model.
`score_pairs` and `pair_metrics` are also used by launch/eval_rm.py, so the scores at the end of training and a
later evaluation come from the same code.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import rlhf_ds
from rlhf_ds import dist
from rlhf_ds.algo.losses import length_slope, odin_loss, pairwise_loss, weighted_pairwise_loss
from rlhf_ds.algo.pairs import pair_metrics
from rlhf_ds.algo.sequence import gather_last
from rlhf_ds.args import (DEFAULT_MAX_LENGTH, RM_GROUPS, DataArguments, RewardArguments, RuntimeArguments,
                          length_debias_parts)
from rlhf_ds.flag_parsing import parse_args
from rlhf_ds.models.saving import gather_state_dict
from rlhf_ds.data.collate import PairCollator, even_shards
from rlhf_ds.data.loading import DataReport, load_examples, tokenize_preference
from rlhf_ds.engines.ds_config import EngineSettings, engine_config
from rlhf_ds.engines.precision import resolve_precision, run_precision
from rlhf_ds.errors import UserError
from rlhf_ds.models.finetuning import apply_finetuning, is_lora
from rlhf_ds.models.heads import HEAD_META, ScalarHeadModel, save_scalar_model
from rlhf_ds.models.loading import load_backbone, load_tokenizer
from rlhf_ds.tracking import progress, setup_logging
from rlhf_ds.trainers.supervised import SupervisedTrainer

logger = logging.getLogger("rlhf_ds.rm")

SCORE_STATS_SAMPLES = 512  # pairs scored for the mean/std stored with the model when there is no eval split
# figures also reported without regress's correction (eval_before_regress_*), so one run shows what it changed
BEFORE_REGRESS = ("eval_accuracy", "eval_accuracy_chosen_shorter", "eval_accuracy_chosen_longer",
                  "eval_length_balanced_accuracy", "eval_score_length_correlation")
REGRESS_SAMPLES = 128  # training pairs scored to fit the length slope (--length_debias regress)


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
    bar = progress(len(batches), desc, disable=disable_tqdm, unit="batch")
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


def write_predictions(path: Path, dataset, chosen: list[float], rejected: list[float]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, (c, r) in enumerate(zip(chosen, rejected)):
            ex = dataset[i]
            f.write(json.dumps({"index": i, "prompt": ex["prompt"], "chosen": ex["chosen"],
                                "rejected": ex["rejected"], "chosen_score": c, "rejected_score": r},
                               ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------- the recipe


class RewardTrainer(SupervisedTrainer):
    name = "reward model"
    kind = "preference"
    unit = "pairs"
    finished_marker = HEAD_META
    log_keys = ("loss", "accuracy", "chosen_score", "rejected_score")

    def __init__(self, *groups):
        super().__init__(*groups)
        self.reward_args: RewardArguments = self.extra_args[0]
        self.debias = self.reward_args.length_debias
        self.methods = length_debias_parts(self.debias)
        self.length_slope: float | None = None
        self.real_pairs = None  # the training pairs before length_negatives adds any (regress fits on these)

    def resume_config(self) -> dict[str, Any]:
        return {**super().resume_config(), "length_debias": self.debias}

    def augment(self, examples):
        """length_negatives: pairs whose rejected answer is a good answer made longer without making it better."""
        self.real_pairs = examples
        if "length_negatives" not in self.methods:
            return examples
        # Only answers short enough to stay shorter than --max_length once padded: a longer one would be cut back
        # to the chosen answer by truncation, and the pair dropped as identical.
        budget = 0.6 * self.max_length

        def fits(ex) -> bool:
            text = "".join(m["content"] for m in ex["prompt"]) + ex["chosen"]
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) <= budget

        candidates = [i for i, ex in enumerate(examples) if fits(ex)]
        padded = length_negatives(examples, self.reward_args.negatives_share, self.args.seed, candidates)
        self.report.add(f"length_negatives: {len(padded)} padded pairs added to {len(examples)} training pairs "
                        f"(made from the {len(candidates)} whose prompt and chosen answer fit in "
                        f"{int(budget)} tokens, 60% of --max_length)")
        if not candidates:
            return examples
        import datasets

        return datasets.concatenate_datasets([examples, padded]).shuffle(seed=self.args.seed)

    def tokenize(self, examples, name: str):
        tokenized = tokenize_preference(examples, self.tokenizer, self.template, self.max_length, self.report,
                                        name=name)
        if "balanced" in self.methods and name == "train":
            weights = balance_weights(tokenized["chosen"], tokenized["rejected"])
            tokenized = tokenized.add_column("pair_weight", weights)
            kinds: dict[str, list[float]] = {}
            for w, c, r in zip(weights, tokenized["chosen"], tokenized["rejected"]):
                kinds.setdefault("chosen shorter" if len(c) < len(r) else "chosen longer" if len(c) > len(r)
                                 else "same length", []).append(w)
            self.report.add("balanced: pair weights " + ", ".join(f"{k} {len(v)} x {v[0]:.2f}"
                                                                  for k, v in sorted(kinds.items())))
        return tokenized

    def make_collator(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id, self.tokenizer.padding_side)

    def loader_columns(self) -> list[str]:
        columns = ["chosen_ids", "rejected_ids", "chosen_prompt_len", "rejected_prompt_len"]
        return columns + (["pair_weight"] if "pair_weight" in self.train_set.column_names else [])

    def build_model(self) -> ScalarHeadModel:
        backbone = load_backbone(self.model_path, self.precision.dtype, self.ds_config)
        if self.model_args.gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return ScalarHeadModel(apply_finetuning(backbone, self.ft_args), length_head="odin" in self.methods)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["attention_mask"]
        extra: dict[str, float] = {}
        if "odin" in self.methods:
            values, length_values, cosine = self.engine(input_ids=batch["input_ids"], attention_mask=mask, both=True)
            quality, length_part = gather_last(values, mask), gather_last(length_values, mask)
            loss, parts = odin_loss(quality, length_part, batch["answer_tokens"].float(), cosine,
                                    self.reward_args.odin_coef)
            extra = {k: v.item() for k, v in parts.items()}
            scores = quality
        else:
            scores = gather_last(self.engine(input_ids=batch["input_ids"], attention_mask=mask), mask)
        chosen, rejected = scores.chunk(2)
        if "balanced" in self.methods:
            loss = weighted_pairwise_loss(chosen, rejected, batch["pair_weight"])
        elif "odin" not in self.methods:
            loss = pairwise_loss(chosen, rejected)
        return loss, {"accuracy": (chosen > rejected).float().mean().item(), "chosen_score": chosen.mean().item(),
                      "rejected_score": rejected.mean().item(), **extra}

    def scores(self, dataset, desc: str) -> tuple[list[float], list[float]]:
        """Scores of every pair as PPO will read them (with the length correction of `regress`)."""
        return self.length_corrected(dataset, *self.raw_scores(dataset, desc))

    def raw_scores(self, dataset, desc: str) -> tuple[list[float], list[float]]:
        return score_pairs(self.engine, dataset, self.rt.per_device_eval_batch_size, self.collator, desc=desc,
                           disable_tqdm=self.rt.disable_tqdm)

    def length_corrected(self, dataset, chosen: list[float], rejected: list[float]) -> tuple[list[float], list[float]]:
        if "regress" in self.methods:
            if self.length_slope is None:
                self.length_slope = self.fit_length_slope()
            chosen = [c - self.length_slope * n for c, n in zip(chosen, answer_tokens(dataset, "chosen"))]
            rejected = [r - self.length_slope * n for r, n in zip(rejected, answer_tokens(dataset, "rejected"))]
        return chosen, rejected

    def fit_length_slope(self) -> float:
        """regress: how much a token of answer length adds to the score, fitted on training pairs (the real ones:
        the padded pairs of length_negatives would teach the fit the opposite of what the data says)."""
        real = self.real_pairs.select(range(min(REGRESS_SAMPLES, len(self.real_pairs))))
        subset = tokenize_preference(real, self.tokenizer, self.template, self.max_length, DataReport(),
                                     name="length slope")
        chosen, rejected = self.raw_scores(subset, "length slope")
        slope = length_slope(chosen + rejected, answer_tokens(subset, "chosen") + answer_tokens(subset, "rejected"))
        logger.info("regress: the score rises by %.4f per answer token on %d training pairs; taken off every score",
                    slope, len(subset))
        return slope

    def evaluate(self, step: int) -> dict[str, float]:
        if "regress" in self.methods:
            self.length_slope = None  # refitted on the model as it is now
        raw = self.raw_scores(self.eval_set, "evaluating")
        chosen, rejected = self.length_corrected(self.eval_set, *raw)
        results = pair_metrics(chosen, rejected, self.eval_set["chosen"], self.eval_set["rejected"])
        if "regress" in self.methods:  # what the correction changed: the same model's figures without it
            before = pair_metrics(*raw, self.eval_set["chosen"], self.eval_set["rejected"])
            results.update({f"eval_before_regress_{k[5:]}": before[k] for k in BEFORE_REGRESS if k in before})
        self.metrics.update(results)
        if dist.is_main():
            write_predictions(self.out / "eval_predictions.jsonl", self.eval_set, chosen, rejected)
        self.tracker.log(results, step, kind="eval")
        logger.info("eval: accuracy %.4f (length-only baseline %.4f; chosen-shorter pairs %s; length-balanced %s; "
                    "score-length correlation %.3f) loss %.4f on %d pairs", results["eval_accuracy"],
                    results["eval_length_baseline_accuracy"], _fmt(results.get("eval_accuracy_chosen_shorter")),
                    _fmt(results.get("eval_length_balanced_accuracy")), results["eval_score_length_correlation"],
                    results["eval_loss"], results["eval_samples"])
        return results

    def _score_stats(self) -> dict[str, Any]:
        """Mean and std of the RM's scores, stored with it so PPO can normalise rewards."""
        if "eval_score_mean" in self.metrics:
            return {"score_mean": self.metrics["eval_score_mean"], "score_std": self.metrics["eval_score_std"],
                    "score_count": 2 * self.metrics["eval_samples"], "score_stats_from": "eval split"}
        subset = self.train_set.select(range(min(SCORE_STATS_SAMPLES, len(self.train_set))))
        chosen, rejected = self.scores(subset, "score statistics")
        stats = pair_metrics(chosen, rejected, subset["chosen"], subset["rejected"], prefix="")
        return {"score_mean": stats["score_mean"], "score_std": stats["score_std"], "score_count": 2 * len(subset),
                "score_stats_from": f"first {len(subset)} training pairs"}

    def _meta(self, final: bool) -> dict[str, Any]:
        name = self.model_args.model_name_or_path
        base = str(Path(name).resolve()) if Path(name).expanduser().is_dir() else name
        meta = {"kind": "reward", "base_model": base, "finetuning_type": self.ft_args.finetuning_type,
                "template": self.template, "max_length": self.max_length, "precision": self.precision.name,
                "length_debias": self.debias, "rlhf_ds_version": rlhf_ds.__version__}
        if self.length_slope is not None:
            meta["length_slope_per_token"] = self.length_slope
        return {**meta, **self.score_stats} if final else meta

    def gather_models(self) -> dict[str, torch.Tensor] | None:
        return gather_state_dict(self.engine, trainable_only=is_lora(self.engine.module))

    def write_models(self, folder: Path, state: dict[str, torch.Tensor], final: bool) -> None:
        save_scalar_model(self.engine.module, state, folder if final else folder / "model", self._meta(final),
                          self.tokenizer)

    def save(self) -> None:
        if "regress" in self.methods and self.length_slope is None:
            self.length_slope = self.fit_length_slope()
        self.score_stats = self._score_stats()  # collective: every rank scores before rank 0 writes
        super().save()


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def answer_tokens(dataset, side: str) -> list[int]:
    return [len(ids) - n for ids, n in zip(dataset[f"{side}_ids"], dataset[f"{side}_prompt_len"])]


def balance_weights(chosen: list[str], rejected: list[str]) -> list[float]:
    """balanced: a weight per pair so that the chosen-shorter and the chosen-longer pairs (and those of equal
    length) each weigh as much in total: 1 / (3 x the share of their kind) over the kinds present."""
    kinds = [(len(c) > len(r)) - (len(c) < len(r)) for c, r in zip(chosen, rejected)]
    counts = {k: kinds.count(k) for k in set(kinds)}
    return [len(kinds) / (len(counts) * counts[k]) for k in kinds]


def length_negatives(examples, share: float, seed: int, candidates: list[int] | None = None):
    """Pairs that teach "longer is not better": the chosen answer against itself made longer — repeated, or
    followed by another record's answer — so that the longer one is the worse. share * len(examples) pairs, their
    answers drawn from `candidates` (indices; default every example)."""
    import random

    import datasets

    rng = random.Random(seed)
    pool = list(range(len(examples))) if candidates is None else candidates
    n = int(round(share * len(examples))) if pool else 0
    picks = [pool[rng.randrange(len(pool))] for _ in range(n)]
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for k, i in enumerate(picks):
        good = examples[i]["chosen"]
        filler = good if k % 2 == 0 else examples[rng.randrange(len(examples))]["chosen"]
        rows["prompt"].append(examples[i]["prompt"])
        rows["chosen"].append(good)
        rows["rejected"].append(f"{good}\n\n{filler}")
    return datasets.Dataset.from_dict(rows, features=examples.features)


def main(argv: list[str] | None = None) -> int:
    return RewardTrainer(*parse_args(*RM_GROUPS, argv=argv)).run()


# ------------------------------------------------------------------------------------- evaluating a saved RM


@dataclass
class RewardEvalArguments:
    reward_model: str = field(default="", metadata={"help": "A folder written by train_rm.py, or by train_dpo.py "
                                                            "(its implicit reward scores the pairs)."})
    output_file: str | None = field(default=None, metadata={"help": "Where the results JSON goes (default "
                                                                    "REWARD_MODEL/eval_<dataset>.json)."})
    predictions_file: str | None = field(default=None, metadata={"help": "Also write every pair's scores "
                                                                         "(JSON Lines)."})


def evaluate_main(argv: list[str] | None = None) -> int:
    """launch/eval_rm.py: score every pair of a preference dataset with a saved reward model."""
    from rlhf_ds.engines.factory import create_inference_engine
    from rlhf_ds.models.heads import load_scalar_model, read_head_meta

    ev, data_args, rt = parse_args(RewardEvalArguments, DataArguments, RuntimeArguments, argv=argv, unused="eval_rm.py")
    dist.init_distributed(rt.dist_timeout)
    setup_logging()
    if not ev.reward_model:
        raise UserError("--reward_model is required: the --output_dir of a train_rm.py run")
    if not data_args.dataset:
        raise UserError("--dataset is required: a registered name or a preference file")
    model_dir = Path(ev.reward_model)
    from rlhf_ds.trainers.dpo import DPO_META, score_with_policy

    is_policy = (model_dir / DPO_META).is_file()  # a train_dpo.py output scores pairs with its implicit reward
    meta = json.loads((model_dir / DPO_META).read_text()) if is_policy else read_head_meta(model_dir)
    # the precision the model was trained in counts as asked for (bf16: where this machine runs it fast)
    trained = meta.get("precision", "fp32")
    prec = (run_precision(rt, model_dir) if (rt.bf16 or rt.fp16 or rt.precision or rt.deepspeed) else
            resolve_precision(bf16=trained == "bf16", fp16=trained == "fp16", model_dir=model_dir))
    precision = prec.name
    logger.info("scoring in %s", prec.describe())
    max_length = data_args.max_length or meta.get("max_length", DEFAULT_MAX_LENGTH)
    settings = EngineSettings(micro_batch=rt.per_device_eval_batch_size, precision=precision, stage=rt.zero_stage,
                              world_size=dist.world_size(),
                              persistence_threshold=rt.stage3_param_persistence_threshold)
    ds_config = engine_config(settings, trainable=False, offload=rt.offload)
    report = DataReport()
    with dist.main_process_first():
        tokenizer = load_tokenizer(model_dir, padding_side="right")
        examples = load_examples(data_args.dataset, "preference", data_args.dataset_dir, data_args.dataset_format,
                                 data_args.max_samples, data_args.keep_ties, report,
                                 max_answers_per_record=data_args.max_answers_per_record)
        dataset = tokenize_preference(examples, tokenizer, meta["template"], max_length, report, name="eval")
    if is_policy:
        chosen, rejected = score_with_policy(model_dir, meta, dataset, tokenizer, prec.dtype, ds_config,
                                             rt.per_device_eval_batch_size, rt.disable_tqdm)
    else:
        model, _ = load_scalar_model(model_dir, prec.dtype, ds_config)
        engine = create_inference_engine(model, ds_config)
        collator = PairCollator(tokenizer.pad_token_id, tokenizer.padding_side)
        chosen, rejected = score_pairs(engine, dataset, rt.per_device_eval_batch_size, collator, desc="scoring",
                                       disable_tqdm=rt.disable_tqdm)
        slope = meta.get("length_slope_per_token")
        if slope:  # --length_debias regress: the length correction stored with the model
            chosen = [c - slope * n for c, n in zip(chosen, answer_tokens(dataset, "chosen"))]
            rejected = [r - slope * n for r, n in zip(rejected, answer_tokens(dataset, "rejected"))]
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
