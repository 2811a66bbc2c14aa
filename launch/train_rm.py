#!/usr/bin/env python
"""Train a reward model from ranked answer pairs.

    python launch/train_rm.py --do_train --dataset comparison_gpt4_zh --finetuning_type lora --output_dir out/rm ...
    deepspeed --num_gpus N launch/train_rm.py ...      torchrun --nproc_per_node N launch/train_rm.py ...

See README.md for every flag (or --help). The logic lives in rlhf_ds/trainers/rm.py.
"""
from rlhf_ds.errors import run_cli
from rlhf_ds.trainers.rm import main

if __name__ == "__main__":
    run_cli(main)
