#!/usr/bin/env python
"""Issue 20's measurement: one reward model per --length_debias method, trained on the same pairs with the same
budget (the `comparison_gpt4_{en,zh}_train` files, which hold no chosen-shorter pair), each scored on the
length-controlled held-out split (`comparison_gpt4_heldout`: 224 chosen-shorter and 224 chosen-longer pairs never
trained on); then PPO from one SFT policy against the plain RM and against a debiased one, for the same steps.
Writes OUT/results.jsonl (one line per run, with the commit, the processor and the precision that ran) and prints a
markdown table of each.

    python benchmarks/length_debias.py --out output/length_debias --model smollm2-135m-instruct
    python benchmarks/length_debias.py --out output/length_debias_qwen --methods none,odin \\
        --ppo_sft output/recipe/sft --ppo_against none,best
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAIR_FIGURES = ("eval_accuracy", "eval_length_baseline_accuracy", "eval_accuracy_chosen_shorter",
                "eval_accuracy_chosen_longer", "eval_length_balanced_accuracy", "eval_score_length_correlation")


def run(cmd: list[str], log: Path) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as sink:
        rc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc:
        raise SystemExit(f"failed (exit {rc}); see {log}")
    return time.time() - t0


def debias_flags(method: str) -> list[str]:
    """`length_negatives@0.5` is --length_debias length_negatives with --negatives_share 0.5 (else its default)."""
    name, _, share = method.partition("@")
    return ["--length_debias", name, *(["--negatives_share", share] if share else [])]


def train_rm(args, method: str, out: Path) -> dict:
    target = out / f"rm-{method}"
    if not (target / "value_head.json").is_file():
        seconds = run([sys.executable, str(REPO / "launch" / "train_rm.py"), "--model_name_or_path", args.model,
                       "--do_train", "--dataset", "comparison_gpt4_en_train,comparison_gpt4_zh_train",
                       "--max_samples", str(args.pairs), "--max_eval_samples", str(args.eval_pairs), "--do_eval",
                       "--eval_dataset", "comparison_gpt4_heldout",
                       "--finetuning_type", "lora", "--per_device_train_batch_size", "4",
                       "--gradient_accumulation_steps", "2", "--learning_rate", str(args.rm_learning_rate),
                       "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05", "--num_train_epochs", "1",
                       "--max_length", str(args.max_length), "--bf16", "--save_steps", "0", "--logging_steps", "4",
                       "--disable_tqdm", "--seed", str(args.seed), "--output_dir", str(target),
                       *debias_flags(method)], out / f"rm-{method}.log")
        stamp(target, seconds, args.commit)
    results = json.loads((target / "eval_results.json").read_text())
    precision = json.loads((target / "training_args.json").read_text()).get("precision")
    row = {"run": "rm", "method": method, **made(target), "precision": precision,
           **{k: results.get(k) for k in PAIR_FIGURES},
           "chosen_shorter_pairs": results.get("eval_chosen_shorter_pairs"), "pairs": results.get("eval_samples")}
    if "eval_before_regress_accuracy" in results:  # the same model without the length correction
        row["before_regress"] = {k: results.get(k.replace("eval_", "eval_before_regress_", 1)) for k in PAIR_FIGURES
                                 if k != "eval_length_baseline_accuracy"}
    return row


def train_ppo(args, method: str, out: Path) -> dict:
    target = out / f"ppo-{method}"
    if not (target / "train_results.json").is_file():
        seconds = run([sys.executable, str(REPO / "launch" / "train_ppo.py"), "--model_name_or_path", args.model,
                       "--do_train", "--dataset", args.ppo_dataset, "--sft_model", args.ppo_sft, "--reward_model",
                       str(out / f"rm-{method}"), "--output_dir", str(target), "--finetuning_type", "lora",
                       "--bf16", "--max_steps", str(args.ppo_steps), "--per_device_train_batch_size", "4",
                       "--gradient_accumulation_steps", "2", "--learning_rate", "2e-4", "--ppo_epochs", "1",
                       "--max_prompt_length", "128", "--max_new_tokens", str(args.max_new_tokens), "--do_eval",
                       "--val_size", str(args.ppo_eval_prompts), "--eval_steps", str(args.ppo_steps),
                       "--save_steps", "0", "--logging_steps", "1", "--disable_tqdm", "--seed", str(args.seed)],
                      out / f"ppo-{method}.log")
        stamp(target, seconds, args.commit)
    evals = [json.loads(x) for x in (target / "eval_results.jsonl").read_text().splitlines() if x.strip()]
    first, last = evals[0], evals[-1]
    return {"run": "ppo", "against": method, **made(target), "steps": args.ppo_steps, "prompts": last["eval_samples"],
            "win_rate_before": first["eval_win_rate"], "win_rate_after": last["eval_win_rate"],
            "length_before": first["eval_response_length"], "length_after": last["eval_response_length"],
            "length_change": (last["eval_response_length"] - first["eval_response_length"])
            / max(first["eval_response_length"], 1e-9), "kl_after": last.get("eval_kl")}


def stamp(target: Path, seconds: float, commit: str) -> None:
    """What made() reads back: a run's wall time and the commit it ran at (runs whose folder already holds a result
    are reused, not run again)."""
    (target / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    (target / "commit.txt").write_text(commit + "\n")


def made(target: Path) -> dict:
    commit = target / "commit.txt"
    return {**({"commit": commit.read_text().strip()} if commit.is_file() else {}),
            "minutes": round(float((target / "wall_seconds.txt").read_text()) / 60, 2)}


def cross_judge(args, out: Path, against: list[str]) -> list[dict]:
    """The SFT policy and each PPO policy answer the same prompts greedily, scored by each reward model in turn
    (rlhf_ds.judge): a PPO run's own eval is judged by the RM it optimised, so the two runs' win rates are read
    by different judges; here every policy faces both."""
    rows = []
    policies = [f"sft={args.ppo_sft}"] + [f"ppo_{m}={out / f'ppo-{m}' / 'actor_merged'}" for m in against]
    for judge_rm in against:
        result = out / f"judge-by-{judge_rm}.json"
        if not result.is_file():
            run([sys.executable, "-m", "rlhf_ds.cli", "judge", *[x for p in policies for x in ("--policy", p)],
                 "--reward_model", str(out / f"rm-{judge_rm}"), "--dataset", args.judge_dataset,
                 "--max_samples", str(args.judge_prompts), "--max_new_tokens", str(args.max_new_tokens), "--bf16",
                 "--output_file", str(result)], out / f"judge-by-{judge_rm}.log")
        judged = json.loads(result.read_text())
        for name, r in judged["policies"].items():
            rows.append({"run": "judge", "judge_rm": judge_rm, "policy": name, "prompts": judged["prompts"],
                         "mean_reward": r["mean_reward"], "mean_length": r["mean_length"],
                         "win_rate_vs_sft": r.get("win_rate_vs_first"),
                         "length_change_vs_sft": r.get("length_change_vs_first")})
    return rows


def pick_best(rows: list[dict]) -> str:
    """The debiasing method issue 20 asks for: the highest length-balanced accuracy among those whose overall
    accuracy is within 3 points of the plain RM's (ties: the higher chosen-shorter accuracy)."""
    plain = next(r for r in rows if r["method"] == "none")
    fair = [r for r in rows if r["method"] != "none" and r["eval_accuracy"] >= plain["eval_accuracy"] - 0.03]
    if not fair:
        fair = [r for r in rows if r["method"] != "none"]
    best = max(fair, key=lambda r: (r["eval_length_balanced_accuracy"], r["eval_accuracy_chosen_shorter"]))
    print(f"best: {best['method']} (length-balanced {best['eval_length_balanced_accuracy']:.3f})", file=sys.stderr)
    return best["method"]


def main() -> None:
    from rlhf_ds.engines.precision import cpu_description

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/length_debias")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--methods", default="none,odin,balanced,regress,length_negatives",
                   help="--length_debias values; length_negatives@SHARE also sets --negatives_share")
    p.add_argument("--pairs", type=int, default=64, help="training pairs from each language's _train file")
    p.add_argument("--eval_pairs", type=int, default=448,
                   help="held-out pairs to score (the file's first N: all 178 English ones come first)")
    p.add_argument("--max_length", type=int, default=192)
    p.add_argument("--rm_learning_rate", type=float, default=2e-4)
    p.add_argument("--ppo_sft", default="", help="an SFT output to start PPO from (PPO runs only when given)")
    p.add_argument("--ppo_against", default="none,best", help="RMs to run PPO against; best: see pick_best")
    p.add_argument("--ppo_dataset", default="alpaca_gpt4_zh", help="PPO's prompts (the recipe's: OUT/data/ppo_prompts.json)")
    p.add_argument("--ppo_steps", type=int, default=8)
    p.add_argument("--ppo_eval_prompts", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--judge_dataset", default="",
                   help="prompts PPO never trained on, answered by the SFT and PPO policies and scored by each RM "
                        "(e.g. the recipe's OUT/data/sft.json); none when empty")
    p.add_argument("--judge_prompts", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    args.commit = commit
    machine = {"commit": commit, "cpu": cpu_description().get("model"), "model": args.model}
    rows = [train_rm(args, m, out) for m in args.methods.split(",")]
    if args.ppo_sft:
        against = [pick_best(rows) if m == "best" else m for m in args.ppo_against.split(",")]
        against = list(dict.fromkeys(against))
        rows += [train_ppo(args, m, out) for m in against]
        if args.judge_dataset:
            rows += cross_judge(args, out, against)
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**machine, **row}) + "\n")
    print("| method | accuracy | length baseline | chosen shorter | chosen longer | length-balanced | "
          "score-length corr. | minutes |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["run"] == "rm":
            print(f"| {r['method']} | " + " | ".join(f"{r[k]:.3f}" for k in PAIR_FIGURES) + f" | {r['minutes']} |")
            if "before_regress" in r:
                before = {**r["before_regress"], "eval_length_baseline_accuracy": r["eval_length_baseline_accuracy"]}
                print(f"| {r['method']}, the same model before its correction | "
                      + " | ".join(f"{before[k]:.3f}" for k in PAIR_FIGURES) + " | |")
    if args.ppo_sft:
        print("\n| PPO against | win rate before -> after | length before -> after (change) | KL | minutes |\n"
              "| --- | --- | --- | --- | --- |")
        for r in rows:
            if r["run"] == "ppo":
                print(f"| {r['against']} | {r['win_rate_before']:.3f} -> {r['win_rate_after']:.3f} | "
                      f"{r['length_before']:.1f} -> {r['length_after']:.1f} ({r['length_change']:+.0%}) | "
                      f"{r['kl_after']:.3f} | {r['minutes']} |")
    if any(r["run"] == "judge" for r in rows):
        print("\n| judged by RM | policy | mean reward | win rate vs SFT | mean length (vs SFT) |\n"
              "| --- | --- | --- | --- | --- |")
        for r in rows:
            if r["run"] == "judge":
                win = "" if r["win_rate_vs_sft"] is None else f"{r['win_rate_vs_sft']:.3f}"
                change = "" if r["length_change_vs_sft"] is None else f" ({r['length_change_vs_sft']:+.0%})"
                print(f"| {r['judge_rm']} | {r['policy']} | {r['mean_reward']:.3f} | {win} | "
                      f"{r['mean_length']:.1f}{change} |")


if __name__ == "__main__":
    main()
