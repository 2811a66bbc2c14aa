"""Greedy answers to the held-out prompts, before training, every --eval_steps and at the end: their reward, the
win rate against the dataset's reference answers (judged by the same reward), the KL to the reference policy, the
length, how many end with EOS or are cut at --max_new_tokens, and, with the math reward, the share answered
correctly (pass@1)."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rlhf_ds import dist
from rlhf_ds.algo.core import has_eos, logprobs_from_logits, masked_sum, response_mask
from rlhf_ds.algo.sequence import pad_sequences
from rlhf_ds.data.collate import even_shards
from rlhf_ds.tracking import format_metrics, progress
from rlhf_ds.trainers.online.experience import ExperienceMaker, response_logits

logger = logging.getLogger("rlhf_ds")


@torch.no_grad()
def evaluate(maker: ExperienceMaker, eval_set, step: int, batch_size: int, out: Path, tracker,
             n_samples_to_log: int, disable_tqdm: bool) -> dict[str, Any]:
    engines, tokenizer, scorer = maker.engines, maker.tokenizer, maker.scorer
    device = dist.device()
    greedy = replace(maker.sampling, do_sample=False)
    found: dict[int, dict[str, float]] = {}
    texts: dict[int, dict[str, Any]] = {}  # the first prompts, kept with their answers for eval_samples.jsonl
    batches = even_shards(len(eval_set), dist.rank(), dist.world_size(), batch_size)
    engines.actor.eval()
    bar = progress(len(batches), f"evaluating (step {step})", disable=disable_tqdm, unit="batch")
    for indices, n_real in batches:
        rows = [eval_set[i] for i in indices]
        prompt_ids, prompt_mask = pad_sequences([r["prompt_ids"] for r in rows], tokenizer.pad_token_id, "left")
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        response, _ = maker.sample(prompt_ids, prompt_mask, greedy, prompt_ids.shape[0])
        mask = response_mask(response, maker.eos_ids)
        seq, att = torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, mask], 1)
        width = response.shape[1]
        kl = None
        if engines.ref is not None:
            logp = logprobs_from_logits(response_logits(engines.actor, seq, att, width), response)
            ref_logp = logprobs_from_logits(response_logits(engines.ref, seq, att, width), response)
            kl = masked_sum(logp - ref_logp, mask, dim=-1)
        prompts = [r["prompt_text"] for r in rows]
        references = [r["reference_text"] for r in rows]
        decoded = maker.decode(response, mask)
        score, parts = scorer(seq, att, prompts, decoded, references, mask.sum(-1))
        ref_ids, ref_att = pad_sequences([r["input_ids"] for r in rows], tokenizer.pad_token_id, "left")
        ref_tokens = torch.tensor([len(r["input_ids"]) - r["prompt_len"] for r in rows])
        ref_score, _ = scorer(ref_ids.to(device), ref_att.to(device), prompts, references, references, ref_tokens)
        ended = has_eos(response, mask, maker.eos_ids).float()
        for k in range(n_real):
            found[indices[k]] = {"reward": score[k].item(), "reference_reward": ref_score[k].item(),
                                 "kl": kl[k].item() if kl is not None else None,
                                 "response_length": mask[k].sum().item(), "eos_rate": ended[k].item(),
                                 **({"accuracy": parts["math"][k].item()} if "math" in parts else {})}
            if indices[k] < n_samples_to_log:
                texts[indices[k]] = {"step": step, "prompt": prompts[k], "response": decoded[k],
                                     "reward": score[k].item(), "reference": references[k],
                                     "reference_reward": ref_score[k].item()}
        bar.update(1)
    bar.close()
    engines.actor.train()
    for part in dist.all_gather_object(found):
        found.update(part)
    for part in dist.all_gather_object(texts):
        texts.update(part)
    rows = list(found.values())
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0] if rows[0][key] is not None}
    wins = [1.0 if r["reward"] > r["reference_reward"] else 0.5 if r["reward"] == r["reference_reward"] else 0.0
            for r in rows]
    result = {"step": step, **{f"eval_{k}": v for k, v in mean.items()}, "eval_win_rate": sum(wins) / len(wins),
              "eval_cut_rate": 1.0 - mean["eos_rate"], "eval_samples": len(rows)}
    if dist.is_main():
        with open(out / "eval_results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        with open(out / "eval_samples.jsonl", "a", encoding="utf-8") as f:
            for index in sorted(texts):
                f.write(json.dumps({"index": index, **texts[index]}, ensure_ascii=False) + "\n")
    tracker.log({k: v for k, v in result.items() if k != "step"}, step, kind="eval")
    logger.info("eval at step %d: %s", step, format_metrics(result, (
        "eval_reward", "eval_accuracy", "eval_win_rate", "eval_kl", "eval_response_length", "eval_eos_rate")))
    return result
