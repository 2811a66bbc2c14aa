#!/usr/bin/env python
"""Which is faster for train_dpo.py on this machine with the default model: the reference log-probabilities computed
once before training (--precompute_ref_logps, the default) or a reference forward every step
(--no_precompute_ref_logps)? Runs the same short DPO (LoRA from the model, so the reference is the model with the
adapter off) both ways, back to back, and prints one JSON line per way: the whole run's wall seconds (start-up,
reference pass and training), its training seconds, and its peak memory.

    python benchmarks/dpo_reference.py --out output/dpo_reference
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from rlhf_ds.engines.precision import cpu_description

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/dpo_reference")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max_length", type=int, default=256)
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    for flag in ("--precompute_ref_logps", "--no_precompute_ref_logps"):
        out = Path(args.out) / flag.strip("-")
        cmd = [sys.executable, str(REPO / "launch" / "train_dpo.py"), "--model_name_or_path", args.model,
               "--do_train", "--dataset", "comparison_gpt4_zh", "--max_samples", str(args.pairs),
               "--num_train_epochs", str(args.epochs), "--finetuning_type", "lora", "--bf16",
               "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-4",
               "--max_length", str(args.max_length), "--save_steps", "0", "--logging_steps", "1", "--disable_tqdm",
               "--overwrite_output_dir", "--output_dir", str(out), flag]
        t0 = time.time()
        with open(Path(args.out) / f"{flag.strip('-')}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            _, status, usage = os.wait4(proc.pid, 0)  # this run's own peak memory comes with it
        wall = time.time() - t0
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{' '.join(cmd)} failed; see {log.name}")
        results = json.loads((out / "train_results.json").read_text())
        precision = json.loads((out / "training_args.json").read_text()).get("precision")
        print(json.dumps({"bench": "dpo_reference", "commit": commit, "cpu": cpu_description().get("model"),
                          "model": args.model, "pairs": args.pairs, "epochs": args.epochs, "mode": flag,
                          "precision": precision, "wall_s": round(wall, 1),
                          "train_s": round(results.get("train_runtime", float("nan")), 1),
                          "peak_memory_gib": round(usage.ru_maxrss / 2 ** 20, 2)}), flush=True)


if __name__ == "__main__":
    main()
