#!/usr/bin/env python
"""Score a preference dataset (any supported format) with a reward model saved by train_rm.py.

    python launch/eval_rm.py --reward_model out/rm --dataset comparison_gpt4_en [--predictions_file p.jsonl]

Writes eval_accuracy beside eval_length_baseline_accuracy, eval_loss, eval_samples and score statistics as JSON
(default REWARD_MODEL/eval_<dataset>.json). The logic lives in rlhf_ds/trainers/rm.py.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("eval-rm")
