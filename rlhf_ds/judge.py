"""Compare policies on held-out prompts as a user would: each answers every prompt greedily, a reward model scores
the answers, and the result is each policy's mean reward and answer length and the win rate of each against the
first (`rlhf-ds judge`; the recipe's DPO path uses it to put the DPO policy beside the SFT one).

    rlhf-ds judge --policy sft=out/sft --policy dpo=out/dpo --reward_model out/rm --dataset prompts.json \
        --max_samples 16 --output_file out/judge.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlhf_ds.algo.sequence import gather_last, pad_sequences
from rlhf_ds.args import DEFAULT_DATASET_DIR
from rlhf_ds.data.loading import load_examples
from rlhf_ds.data.template import render_prompt
from rlhf_ds.errors import UserError
from rlhf_ds.inference import Policy
from rlhf_ds.models.heads import length_corrected, load_scalar_model
from rlhf_ds.models.loading import load_tokenizer, quiet_transformers


@torch.no_grad()
def reward_of(model, tokenizer, meta: dict, prompts: list[list[dict]], answers: list[str],
              batch: int = 8) -> list[float]:
    """The reward model's score of each answer, read as it was trained: prompt + answer + EOS, at the last token
    (with its length correction, if it was trained with one)."""
    template = meta["template"]
    scores = []
    for i in range(0, len(prompts), batch):
        seqs, lengths = [], []
        for messages, answer in zip(prompts[i:i + batch], answers[i:i + batch]):
            prompt = tokenizer(render_prompt(tokenizer, messages, template),
                               add_special_tokens=template == "plain")["input_ids"]
            reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(prompt + reply)
            lengths.append(len(reply))
        ids, mask = pad_sequences(seqs, tokenizer.pad_token_id, "right")
        scores += length_corrected(gather_last(model(ids, mask), mask), torch.tensor(lengths), meta).tolist()
    return scores


def judge(policies: dict[str, str], reward_model: str, dataset: str, max_samples: int, max_new_tokens: int,
          dtype: torch.dtype = torch.float32, batch: int = 8) -> dict:
    examples = load_examples(dataset, "sft", DEFAULT_DATASET_DIR, max_samples=max_samples)
    prompts = examples["prompt"]
    rm, meta = load_scalar_model(reward_model, dtype)
    rm.eval()
    rm_tokenizer = load_tokenizer(reward_model, padding_side="right")
    results: dict = {"prompts": len(prompts), "reward_model": str(reward_model), "policies": {}}
    answers: dict[str, list[str]] = {}
    for name, path in policies.items():
        policy = Policy(path, dtype=dtype)
        answers[name] = []
        for i in range(0, len(prompts), batch):
            answers[name] += [a.strip() for a in policy.answer(prompts[i:i + batch], max_new_tokens=max_new_tokens)]
        rewards = reward_of(rm, rm_tokenizer, meta, prompts, answers[name])
        lengths = [len(policy.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers[name]]
        results["policies"][name] = {"path": str(path), "mean_reward": sum(rewards) / len(rewards),
                                     "mean_length": sum(lengths) / len(lengths), "rewards": rewards,
                                     "lengths": lengths}
        del policy
    first = next(iter(policies))
    for name in list(policies)[1:]:
        a, b = results["policies"][first]["rewards"], results["policies"][name]["rewards"]
        wins = [1.0 if y > x else 0.5 if y == x else 0.0 for x, y in zip(a, b)]
        la, lb = results["policies"][first]["mean_length"], results["policies"][name]["mean_length"]
        results["policies"][name].update(win_rate_vs_first=sum(wins) / len(wins),
                                         length_change_vs_first=(lb - la) / max(la, 1e-9))
    results["samples"] = [{"prompt": p[-1]["content"], **{n: answers[n][k] for n in policies}}
                          for k, p in enumerate(prompts)]
    return results


def main(argv: list[str] | None = None) -> int:
    from rlhf_ds.engines.precision import resolve_precision

    parser = argparse.ArgumentParser(prog="rlhf-ds judge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", action="append", required=True, help="NAME=FOLDER; the first is the baseline")
    parser.add_argument("--reward_model", required=True)
    parser.add_argument("--dataset", required=True, help="prompts (any layout with one answer: alpaca, qa)")
    parser.add_argument("--max_samples", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--output_file", required=True)
    parser.add_argument("--bf16", action="store_true", help="bf16 where this machine runs it fast (else fp32)")
    args = parser.parse_args(argv)
    quiet_transformers()
    policies = {}
    for spec in args.policy:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--policy {spec!r}: write it as NAME=FOLDER")
        policies[name] = path
    if len(policies) < 2:
        raise UserError("give at least two --policy NAME=FOLDER to compare")
    results = judge(policies, args.reward_model, args.dataset, args.max_samples, args.max_new_tokens,
                    resolve_precision(bf16=args.bf16).dtype)
    Path(args.output_file).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    for name, r in results["policies"].items():
        extra = (f", win rate vs {next(iter(policies))} {r['win_rate_vs_first']:.3f}, length "
                 f"{r['length_change_vs_first']:+.0%}" if "win_rate_vs_first" in r else "")
        print(f"{name}: mean reward {r['mean_reward']:.3f}, mean length {r['mean_length']:.1f} tokens{extra}")
    return 0
