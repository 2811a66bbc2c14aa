#!/usr/bin/env python
"""Reward models side by side on Chinese held-out pairs that none of them trained on or was scored on by the recipe.

The recipe's RM trains on comparison_gpt4_zh_train and is scored on the first 44 pairs of
comparison_gpt4_zh_heldout; this scores each RM given (e.g. the recipe's and a plain one trained with the same
command and `--length_debias none`) on the next --pairs of that file with eval_rm.py, its stored length correction
applied as PPO reads it. Writes OUT/results.jsonl (one line per RM, with the commit, the processor and the
precision) and prints a markdown table.

    python benchmarks/recipe_rm_heldout.py --rm none=out/rm_plain --rm length_negatives+regress=output/recipe/rm \\
        --out output/recipe_rm_heldout
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
SKIP = 44  # comparison_gpt4_zh_heldout's first pairs: the recipe scores its RM on them (rm_eval)
FIGURES = ("eval_accuracy", "eval_length_baseline_accuracy", "eval_accuracy_chosen_shorter",
           "eval_accuracy_chosen_longer", "eval_length_balanced_accuracy", "eval_score_length_correlation",
           "eval_chosen_shorter_pairs", "eval_samples")


def main() -> None:
    from rlhf_ds.args import DEFAULT_DATASET_DIR
    from rlhf_ds.benchmarks import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rm", action="append", required=True, help="NAME=DIR of a train_rm.py output (repeatable)")
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--max_length", type=int, default=256, help="the recipe's (bf16 profile; fp32: 192)")
    p.add_argument("--out", default="output/recipe_rm_heldout")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = json.loads((Path(DEFAULT_DATASET_DIR) / "comparison_gpt4_zh_heldout.json").read_text(encoding="utf-8"))
    pairs = out / "pairs.json"
    pairs.write_text(json.dumps(held[SKIP:SKIP + args.pairs], ensure_ascii=False), encoding="utf-8")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    rows = []
    for spec in args.rm:
        name, _, folder = spec.partition("=")
        result = out / f"eval-{name}.json"
        t0 = time.time()
        subprocess.run([sys.executable, str(REPO / "launch" / "eval_rm.py"), "--reward_model", folder, "--dataset",
                        str(pairs), "--max_length", str(args.max_length), "--output_file", str(result),
                        "--disable_tqdm"], check=True, cwd=REPO)
        meta = json.loads((Path(folder) / "value_head.json").read_text())
        figures = json.loads(result.read_text())
        rows.append({"rm": name, "folder": folder, "length_debias": meta.get("length_debias", "none"),
                     "precision": meta.get("precision"), "commit": commit, **machine(),
                     "pairs": f"comparison_gpt4_zh_heldout[{SKIP}:{SKIP + args.pairs}]",
                     "seconds": round(time.time() - t0, 1), **{k: figures.get(k) for k in FIGURES}})
    with open(out / "results.jsonl", "a") as sink:
        for row in rows:
            sink.write(json.dumps(row) + "\n")
    print("| RM | accuracy | length baseline | chosen shorter (pairs) | chosen longer | length-balanced | "
          "score-length corr. |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['rm']} | {r['eval_accuracy']:.3f} | {r['eval_length_baseline_accuracy']:.3f} | "
              f"{r['eval_accuracy_chosen_shorter']:.3f} ({r['eval_chosen_shorter_pairs']}) | "
              f"{r['eval_accuracy_chosen_longer']:.3f} | {r['eval_length_balanced_accuracy']:.3f} | "
              f"{r['eval_score_length_correlation']:.3f} |")


if __name__ == "__main__":
    main()
