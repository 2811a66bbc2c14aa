"""DPO and its family (IPO, hinge, conservative DPO, SimPO, ORPO): train a policy directly on preference pairs, no
reward model and no sampling. The losses are pure functions in rlhf_ds/algo/preference.py, chosen by --loss_type;
the life of the run is trainers/base.py and its step trainers/supervised.py.

Per micro-batch the chosen and the rejected answers go through the policy in one forward (a batch of 2B rows, left
padded, logits for the answer positions only); the reference's log-probabilities of the same answers are computed
once for every pair before training (--precompute_ref_logps, the default: the reference is then freed) or by a
reference forward every step.
"""
from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

import torch

import rlhf_ds
from rlhf_ds import dist
from rlhf_ds.algo.core import logprobs_from_logits
from rlhf_ds.algo.preference import PREFERENCE_LOSSES
from rlhf_ds.algo.sequence import SharedPromptPairs, position_ids_from_mask
from rlhf_ds.args import DPO_GROUPS, DPOArguments, PolicyArguments
from rlhf_ds.flag_parsing import parse_args
from rlhf_ds.data.collate import PreferenceCollator, even_shards
from rlhf_ds.data.loading import tokenize_preference
from rlhf_ds.engines.ds_config import EngineSettings, engine_config
from rlhf_ds.engines.factory import create_inference_engine
from rlhf_ds.models.finetuning import hf_model, is_lora, on_attention_interface
from rlhf_ds.models.loading import resolve_model_path
from rlhf_ds.models.policy import PolicyStart, load_policy
from rlhf_ds.models.saving import gather_state_dict, is_adapter_dir, save_causal_lm
from rlhf_ds.tracking import progress
from rlhf_ds.algo.pairs import pair_metrics
from rlhf_ds.trainers.rm import write_predictions
from rlhf_ds.trainers.supervised import SupervisedTrainer

logger = logging.getLogger("rlhf_ds.dpo")

DPO_META = "dpo.json"  # written with the policy: how to score pairs with it (eval_rm.py), what it was trained from


# Packing a pair behind its prompt saves the prompt's second pass but lengthens the rows that attention covers, so
# it is used where it saves at least this share of the tokens (measured: docs/benchmarks.md, "DPO step").
SHARED_PROMPT_MIN_SAVING = 0.2


def answer_logprobs(model, batch: dict[str, torch.Tensor], share_prompt: bool | None = None) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its answer tokens and their count (2B rows: chosen, then rejected).

    With `share_prompt`, a pair's prompt goes through the model once, its two answers packed behind it
    (SharedPromptPairs), when the model takes a 4D attention mask; None (the default) packs only where that saves
    at least a fifth of the tokens (SHARED_PROMPT_MIN_SAVING). Otherwise the 2B rows go through as they are, the
    logits computed from the earliest answer position on (with left padding: the answers' width only). Both give
    the same numbers (tests/trainers/test_train_dpo.py)."""
    ids, att, answer = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
    packed = SharedPromptPairs.from_batch(ids, att, answer, pad_id=0) if (
        share_prompt is not False and takes_4d_mask(model)) else None
    if packed is not None and (share_prompt or packed.tokens() <= (1 - SHARED_PROMPT_MIN_SAVING) * ids.numel()):
        out = model(input_ids=packed.input_ids, attention_mask=_packed_mask(model, packed),
                    position_ids=packed.position_ids, use_cache=False, logits_to_keep=packed.logits_to_keep)
        logp = logprobs_from_logits(packed.answer_logits(out.logits), packed.targets)
        mask = packed.target_mask.to(logp.dtype)
        return (logp * mask).sum(-1), mask.sum(-1)
    first = int(answer.float().argmax(-1).min().item())
    out = model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att), use_cache=False,
                logits_to_keep=ids.shape[1] - first + 1)
    logp = logprobs_from_logits(out.logits[:, :-1], ids[:, first:])  # logits at t - 1 predict token t
    mask = answer[:, first:].to(logp.dtype)
    return (logp * mask).sum(-1), mask.sum(-1)


def takes_4d_mask(model) -> bool:
    """Whether the model reads a custom [B, 1, T, T] attention mask: transformers models on its attention
    interface do under SDPA or eager attention (create_causal_mask passes such a mask through); flash-attention
    kernels and ChatGLM's own code do not."""
    return on_attention_interface(model) and getattr(hf_model(model).config, "_attn_implementation", None) in (
        "sdpa", "eager")


def _packed_mask(model, packed: SharedPromptPairs) -> torch.Tensor:
    """SDPA takes the boolean mask as it is; eager attention adds it, so it gets 0 / the dtype's minimum."""
    hf = hf_model(model)
    if getattr(hf.config, "_attn_implementation", None) == "sdpa":
        return packed.mask.unsqueeze(1)
    return packed.additive_mask(hf.get_input_embeddings().weight.dtype)


@torch.no_grad()
def score_pairs_by(fn, dataset, collator, batch_size: int, desc: str, disable_tqdm: bool = False) -> tuple[
        list[float], list[float]]:
    """fn(batch) -> one number per row (2B rows: chosen, then rejected) for every pair of `dataset`, split over the
    ranks and gathered: (chosen values, rejected values) in dataset order, the same on every rank."""
    device = dist.device()
    batches = even_shards(len(dataset), dist.rank(), dist.world_size(), batch_size)
    found: dict[int, tuple[float, float]] = {}
    bar = progress(len(batches), desc, disable=disable_tqdm, unit="batch")
    for indices, n_real in batches:
        batch = {k: v.to(device) for k, v in collator([dataset[i] for i in indices]).items()}
        c, r = fn(batch).float().cpu().chunk(2)
        for k in range(n_real):
            found[indices[k]] = (c[k].item(), r[k].item())
        bar.update(1)
    bar.close()
    for part in dist.all_gather_object(found):
        found.update(part)
    return [found[i][0] for i in range(len(dataset))], [found[i][1] for i in range(len(dataset))]


class Reference:
    """The reference policy's log-probabilities: the policy with its adapter switched off (LoRA started from a full
    model, no second copy), or a frozen engine of its own (an SFT adapter, full fine-tuning, --ref_model)."""

    def __init__(self, policy_engine, engine=None, share_prompt: bool | None = None):
        self.policy, self.engine, self.share_prompt = policy_engine, engine, share_prompt

    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.engine is not None:
            return answer_logprobs(self.engine, batch, self.share_prompt)[0]
        module = self.policy.module
        was_training = module.training
        module.eval()
        with module.disable_adapter():
            logps = answer_logprobs(self.policy, batch, self.share_prompt)[0]
        module.train(was_training)
        return logps

    def release(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
            gc.collect()


class DPOTrainer(SupervisedTrainer):
    name = "DPO"
    kind = "preference"
    unit = "pairs"
    log_keys = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps",
                "rejected_logps")

    def __init__(self, *groups):
        super().__init__(*groups)
        self.policy_args: PolicyArguments = self.extra_args[0]
        self.dpo: DPOArguments = self.extra_args[1]
        self.loss_fn = PREFERENCE_LOSSES[self.dpo.loss_type]
        self.share_prompt = {"auto": None, "on": True, "off": False}[self.dpo.share_prompt]

    # ----------------------------------------------------------------------------------------------- data
    def resume_config(self) -> dict[str, Any]:
        d = self.dpo
        return {**super().resume_config(), "sft_model": self.policy_args.sft_model, "loss_type": d.loss_type,
                "beta": d.beta, "ref_model": d.ref_model, "precompute_ref_logps": d.precompute_ref_logps}

    def setup_data(self) -> None:
        self.start = PolicyStart(resolve_model_path(self.model_args.model_name_or_path), self.policy_args.sft_model)
        self.start.check()
        super().setup_data()

    def tokenizer_source(self) -> Path:
        return self.start.tokenizer_dir

    def tokenize(self, examples, name: str):
        return tokenize_preference(examples, self.tokenizer, self.template, self.max_length, self.report, name=name)

    def make_collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id, "left")

    def loader_columns(self) -> list[str]:
        columns = ["chosen_ids", "rejected_ids", "chosen_prompt_len", "rejected_prompt_len"]
        return columns + [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in self.train_set.column_names]

    # ------------------------------------------------------------------------------------------- engines
    def build_model(self) -> torch.nn.Module:
        return load_policy(self.start, self.precision.dtype, self.ds_config, self.ft_args, trainable=True,
                           gradient_checkpointing=self.model_args.gradient_checkpointing)

    def build_engines(self) -> None:
        super().build_engines()
        self.reference = Reference(self.engine, self.reference_engine(), self.share_prompt)
        if self.loss_fn.needs_reference and self.dpo.precompute_ref_logps:
            self.train_set = self.add_reference_logps(self.train_set, "reference log-probs (train)")
            if self.eval_set is not None:
                self.eval_set = self.add_reference_logps(self.eval_set, "reference log-probs (eval)")
            self.reference.release()  # never needed again: its memory goes back before training
            self.loader, self.sampler, _, _ = self.make_loader()

    def reference_engine(self):
        """A frozen reference engine when the policy cannot serve as its own reference, else None."""
        if not self.loss_fn.needs_reference:
            return None
        source = self.dpo.ref_model
        if source is None and is_lora(self.engine.module) and not self.start.adapter:
            return None  # the policy with its adapter switched off is the starting policy
        start = self.start if source is None else PolicyStart(
            self.start.base if is_adapter_dir(source) else Path(source), source if is_adapter_dir(source) else None)
        stage = self.policy_args.ref_zero_stage
        if stage is None:
            stage = 3 if self.ds_config["zero_optimization"]["stage"] == 3 else 0
        if self.policy_args.offload_reference_model:
            stage = 3
        settings = EngineSettings(micro_batch=2 * self.args.per_device_train_batch_size,
                                  precision=self.precision.name, stage=stage, world_size=dist.world_size(),
                                  persistence_threshold=self.rt.stage3_param_persistence_threshold)
        cfg = engine_config(settings, trainable=False, offload=self.policy_args.offload_reference_model)
        ft = type(self.ft_args)(finetuning_type="full")
        model = load_policy(start, self.precision.dtype, cfg if stage == 3 else None, ft, trainable=False)
        engine = create_inference_engine(model, cfg)
        logger.info("reference ZeRO-%d %s: %s", engine.zero_optimization_stage(), self.precision.name,
                    source or self.start.sft or self.start.base)
        return engine

    def add_reference_logps(self, dataset, desc: str):
        """The reference's log-probability of every pair's chosen and rejected answer, as two new columns."""
        chosen, rejected = self.score_dataset(dataset, lambda batch: self.reference.logprobs(batch), desc)
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    def score_dataset(self, dataset, fn, desc: str) -> tuple[list[float], list[float]]:
        return score_pairs_by(fn, dataset, self.collator, self.rt.per_device_eval_batch_size, desc,
                              self.rt.disable_tqdm)

    # ------------------------------------------------------------------------------------------ one batch
    def pair_losses(self, batch: dict[str, torch.Tensor]):
        logps, lengths = answer_logprobs(self.engine, batch, self.share_prompt)
        pc, pr = logps.chunk(2)
        lc, lr = lengths.chunk(2)
        if not self.loss_fn.needs_reference:
            rc = rr = torch.zeros_like(pc)
        elif "ref_chosen_logps" in batch:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            rc, rr = self.reference.logprobs(batch).chunk(2)
        d = self.dpo
        losses, chosen, rejected = self.loss_fn(pc, pr, rc.to(pc.dtype), rr.to(pc.dtype), lc.clamp(min=1),
                                                lr.clamp(min=1), beta=d.beta, label_smoothing=d.label_smoothing,
                                                simpo_gamma=d.simpo_gamma)
        return losses, chosen, rejected, (pc, pr, lc, lr)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        losses, chosen, rejected, (pc, pr, lc, lr) = self.pair_losses(batch)
        return losses.mean(), {
            "reward_accuracy": (chosen > rejected).float().mean().item(),
            "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item(),
            "reward_margin": (chosen - rejected).mean().item(),
            "chosen_logps": pc.detach().mean().item(), "rejected_logps": pr.detach().mean().item(),
            "chosen_length": lc.mean().item(), "rejected_length": lr.mean().item()}

    # ------------------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """The implicit reward's accuracy on held-out pairs beside "the longer answer wins" on the same pairs."""
        self.engine.eval()
        rewards: dict[str, list[float]] = {"chosen": [], "rejected": []}

        def implicit(batch):
            _, chosen, rejected, _ = self.pair_losses(batch)
            return torch.cat([chosen, rejected])

        chosen, rejected = self.score_dataset(self.eval_set, implicit, "evaluating")
        self.engine.train()
        rewards["chosen"], rewards["rejected"] = chosen, rejected
        results = pair_metrics(chosen, rejected, self.eval_set["chosen"], self.eval_set["rejected"])
        self.metrics.update(results)
        if dist.is_main():
            write_predictions(self.out / "eval_predictions.jsonl", self.eval_set, chosen, rejected)
        self.tracker.log(results, step, kind="eval")
        logger.info("eval: implicit-reward accuracy %.4f (length-only baseline %.4f) on %d pairs",
                    results["eval_accuracy"], results["eval_length_baseline_accuracy"], results["eval_samples"])
        return results

    # ----------------------------------------------------------------------------------------------- save
    def gather_models(self) -> dict[str, torch.Tensor] | None:
        return gather_state_dict(self.engine, trainable_only=is_lora(self.engine.module))

    def write_models(self, folder: Path, state: dict[str, torch.Tensor], final: bool) -> None:
        target = folder if final else folder / "model"
        save_causal_lm(self.engine.module, state, target, self.tokenizer)
        d = self.dpo
        meta = {"kind": "dpo", "base_model": str(self.start.base), "sft_model": self.start.sft,
                "ref_model": d.ref_model, "loss_type": d.loss_type, "beta": d.beta,
                "label_smoothing": d.label_smoothing, "simpo_gamma": d.simpo_gamma, "template": self.template,
                "max_length": self.max_length, "precision": self.precision.name,
                "finetuning_type": self.ft_args.finetuning_type, "rlhf_ds_version": rlhf_ds.__version__}
        (target / DPO_META).write_text(json.dumps(meta, indent=2))


def main(argv: list[str] | None = None) -> int:
    return DPOTrainer(*parse_args(*DPO_GROUPS, argv=argv)).run()


# ------------------------------------------------------------------------------ scoring pairs with a saved policy
def score_with_policy(model_dir: Path, meta: dict, dataset, tokenizer, dtype: torch.dtype, ds_config: dict,
                      batch_size: int, disable_tqdm: bool = False) -> tuple[list[float], list[float]]:
    """eval_rm.py on a train_dpo.py output: every pair's implicit rewards under the loss it was trained with
    (DPO: beta * (log pi - log pi_ref); SimPO, ORPO: beta times the per-token log-probability)."""
    from peft import PeftModel

    from rlhf_ds.args import FinetuningArguments
    from rlhf_ds.models.loading import load_causal_lm

    loss_fn = PREFERENCE_LOSSES[meta["loss_type"]]
    start = PolicyStart(Path(meta["base_model"]), meta.get("sft_model"))
    stage3 = ds_config["zero_optimization"]["stage"] == 3
    if is_adapter_dir(model_dir):
        policy = PeftModel.from_pretrained(load_causal_lm(start.weights, dtype, ds_config if stage3 else None),
                                           str(model_dir))
    else:
        policy = load_causal_lm(model_dir, dtype, ds_config if stage3 else None)
    policy_engine = create_inference_engine(policy, ds_config)
    reference = None
    if loss_fn.needs_reference:
        source = meta.get("ref_model")
        if source:
            start = PolicyStart(start.base if is_adapter_dir(source) else Path(source),
                                source if is_adapter_dir(source) else None)
        model = load_policy(start, dtype, ds_config if stage3 else None, FinetuningArguments(finetuning_type="full"),
                            trainable=False)
        reference = create_inference_engine(model, ds_config)

    def implicit(batch):
        pc, pr = answer_logprobs(policy_engine, batch)[0].chunk(2)
        lc, lr = batch["answer_mask"].sum(-1).float().clamp(min=1).chunk(2)
        rc, rr = (answer_logprobs(reference, batch)[0].chunk(2) if reference is not None else
                  (torch.zeros_like(pc), torch.zeros_like(pr)))
        _, chosen, rejected = loss_fn(pc, pr, rc, rr, lc, lr, beta=meta["beta"],
                                      label_smoothing=meta.get("label_smoothing", 0.0),
                                      simpo_gamma=meta.get("simpo_gamma", 0.5))
        return torch.cat([chosen, rejected])

    collator = PreferenceCollator(tokenizer.pad_token_id, "left")
    return score_pairs_by(implicit, dataset, collator, batch_size, "scoring", disable_tqdm)
