#!/usr/bin/env python
"""Supervised fine-tuning on instruction data (the loss on the answer tokens only).

    python launch/train_sft.py --do_train --dataset alpaca_gpt4_zh --finetuning_type lora --output_dir out/sft ...
    deepspeed --num_gpus N launch/train_sft.py ...      torchrun --nproc_per_node N launch/train_sft.py ...

Its --output_dir is what train_ppo.py --checkpoint_dir takes. The logic lives in rlhf_ds/trainers/sft.py.
"""
from rlhf_ds.errors import run_cli
from rlhf_ds.trainers.sft import main

if __name__ == "__main__":
    run_cli(main)
