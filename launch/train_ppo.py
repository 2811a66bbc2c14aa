#!/usr/bin/env python
"""Optimise a policy with PPO against a reward model and/or reward functions, with a KL penalty to a frozen
reference. Four DeepSpeed engines per rank: actor, critic, reference, reward.

    python launch/train_ppo.py --do_train --dataset alpaca_gpt4_zh --finetuning_type lora \
        --sft_model out/sft --reward_model out/rm --output_dir out/ppo ...
    deepspeed --num_gpus N launch/train_ppo.py ...      torchrun --nproc_per_node N launch/train_ppo.py ...

The same trainer as train_grpo.py with PPO's defaults (--advantage_estimator gae). The logic lives in
rlhf_ds/trainers/online/, the math in rlhf_ds/algo/.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("train-ppo")
