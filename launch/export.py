#!/usr/bin/env python
"""Turn a stage's output into one plain Hugging Face folder (AutoModelForCausalLM.from_pretrained loads it; no
rlhf_ds or peft needed): a LoRA adapter is merged into its base model.

    python launch/export.py --model_dir out/ppo --output_dir out/ppo-merged      # an online run: its actor
    python launch/export.py --model_dir out/sft --output_dir out/sft-merged [--base_model smollm2-135m-instruct]

The logic lives in rlhf_ds/export.py.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("export")
