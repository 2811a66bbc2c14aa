#!/usr/bin/env python
"""Offline preference optimisation: DPO (--loss_type sigmoid), IPO, hinge, conservative DPO (--label_smoothing),
SimPO and ORPO on ranked or paired answers, no reward model and no sampling.

    python launch/train_dpo.py --do_train --dataset comparison_gpt4_zh --finetuning_type lora --sft_model out/sft \
        --output_dir out/dpo --beta 0.1 --do_eval --val_size 0.1 ...
    deepspeed --num_gpus N launch/train_dpo.py ...      torchrun --nproc_per_node N launch/train_dpo.py ...

The logic lives in rlhf_ds/trainers/dpo.py, the losses in rlhf_ds/algo/preference.py.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("train-dpo")
