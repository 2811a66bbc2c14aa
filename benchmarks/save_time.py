#!/usr/bin/env python
"""How long a checkpoint of the recipe's PPO stage takes to write on this machine (issue 17: what to give SLURM's
--signal=USR1@N). Runs train_ppo.py with the recipe's PPO settings for a few steps from a recipe's SFT and RM
outputs, saving after every step, and reads the lines each save logs ("saved checkpoint ... (MB, s)"). Prints one
JSON line with the commit and the machine.

    python benchmarks/save_time.py --recipe output/recipe --out output/save_time
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAVED = re.compile(r"saved checkpoint (\S+) \(([\d.]+) MB, ([\d.]+) s\)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="a finished run_recipe.py output (its sft/, rm/, data/)")
    p.add_argument("--out", required=True, help="a new folder for the PPO run")
    p.add_argument("--model", default="", help="default: the recipe's model (from its recipe.json)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    from rlhf_ds.benchmarks import machine

    recipe = Path(args.recipe)
    model = args.model or json.loads((recipe / "recipe.json").read_text())["model"]
    out = Path(args.out)
    cmd = [sys.executable, str(REPO / "launch" / "train_ppo.py"), "--model_name_or_path", model, "--do_train",
           "--finetuning_type", "lora", "--bf16", "--dataset", str(recipe / "data" / "ppo_prompts.json"),
           "--sft_model", str(recipe / "sft"), "--reward_model", str(recipe / "rm"), "--output_dir", str(out),
           "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps",
           str(args.steps), "--save_steps", "1", "--logging_steps", "1", "--max_prompt_length", "128",
           "--max_new_tokens", "32", "--disable_tqdm"]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"train_ppo.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    saves = [{"checkpoint": Path(m[1]).name, "mb": float(m[2]), "seconds": float(m[3])}
             for m in SAVED.finditer(proc.stdout + proc.stderr)]
    if not saves:
        raise SystemExit("no 'saved checkpoint' line in the run's output")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "train"]
    print(json.dumps({"bench": "save_time", "commit": commit, "command": " ".join(["python", *sys.argv]),
                      **machine(), "model": model,
                      "run": "recipe PPO stage: LoRA actor and critic, frozen reference and reward model, default ZeRO stages, "
                             "one process", "precision": json.loads((out / "training_args.json").read_text())
                      .get("precision"), "median_save_s": statistics.median(s["seconds"] for s in saves),
                      "max_save_s": max(s["seconds"] for s in saves), "checkpoint_mb": saves[-1]["mb"],
                      "run_minutes": round((time.time() - t0) / 60, 2), "saves": saves,
                      "steps": [{k: r.get(k) for k in ("step", "time_generation", "time_experience", "time_training")}
                                for r in steps]}))


if __name__ == "__main__":
    main()
