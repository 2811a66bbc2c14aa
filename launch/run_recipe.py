#!/usr/bin/env python
"""The whole recipe in one command: SFT on alpaca_gpt4_zh -> reward model on comparison_gpt4_zh -> PPO on held-out
alpaca_gpt4_zh prompts -> OUTPUT/report.md. Sized by default to about 20 minutes on a 2-core CPU machine.

    python launch/run_recipe.py                                         # output/recipe/
    python launch/run_recipe.py --model smollm2-135m-instruct --output_dir output/smol
    python launch/run_recipe.py --launcher "deepspeed --num_gpus 2"     # every stage on 2 ranks

A stage that finished earlier is kept (--overwrite redoes it). The logic lives in rlhf_ds/recipe.py.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("recipe")
