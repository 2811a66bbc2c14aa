#!/usr/bin/env python
"""Supervised fine-tuning on instruction data (the loss on the answer tokens only).

    python launch/train_sft.py --do_train --dataset alpaca_gpt4_zh --finetuning_type lora --output_dir out/sft ...
    deepspeed --num_gpus N launch/train_sft.py ...      torchrun --nproc_per_node N launch/train_sft.py ...

Its --output_dir is what train_ppo.py / train_grpo.py --sft_model and train_dpo.py take. The logic lives in
rlhf_ds/trainers/sft.py; `rlhf-ds train-sft` is the same command.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("train-sft")
