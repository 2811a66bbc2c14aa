#!/usr/bin/env python
"""Optimise a policy with PPO against a reward model (or a reward function), with a KL penalty to a frozen
reference. Four DeepSpeed engines per rank: actor, critic, reference, reward.

    python launch/train_ppo.py --do_train --dataset alpaca_gpt4_zh --finetuning_type lora \
        --checkpoint_dir out/sft --reward_model out/rm --output_dir out/ppo ...
    deepspeed --num_gpus N launch/train_ppo.py ...      torchrun --nproc_per_node N launch/train_ppo.py ...

See README.md for every flag (or --help). The logic lives in rlhf_ds/trainers/ppo.py, the math in rlhf_ds/algo/ppo.py.
"""
from rlhf_ds.errors import run_cli
from rlhf_ds.trainers.ppo import main

if __name__ == "__main__":
    run_cli(main)
