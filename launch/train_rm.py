#!/usr/bin/env python
"""Train a reward model from ranked answer pairs (-log sigmoid(r_chosen - r_rejected)).

    python launch/train_rm.py --do_train --dataset comparison_gpt4_zh --finetuning_type lora --output_dir out/rm ...
    deepspeed --num_gpus N launch/train_rm.py ...      torchrun --nproc_per_node N launch/train_rm.py ...

The logic lives in rlhf_ds/trainers/rm.py; `rlhf-ds train-rm` is the same command.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("train-rm")
