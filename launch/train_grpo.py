#!/usr/bin/env python
"""Critic-free online RL: GRPO by default (--advantage_estimator grpo, 4 answers per prompt, KL in the loss),
also dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline; rule rewards (--reward_fn math,format) and/or a reward
model. No critic engine is built.

    python launch/train_grpo.py --do_train --dataset gsm8k_train --reward_fn math --output_dir out/grpo ...
    deepspeed --num_gpus N launch/train_grpo.py ...      torchrun --nproc_per_node N launch/train_grpo.py ...

The same trainer as train_ppo.py with GRPO's defaults. The logic lives in rlhf_ds/trainers/online/.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("train-grpo")
