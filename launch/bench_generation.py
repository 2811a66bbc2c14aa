#!/usr/bin/env python
"""Generation throughput under ZeRO-3: plain engine.module.generate vs our hybrid engine vs Hugging Face without
DeepSpeed, same model, prompts and settings, in one run. Prints one JSON line.

    deepspeed --num_gpus 2 launch/bench_generation.py                      # CPU: 2 processes, opt-7m
    deepspeed --num_gpus 1 launch/bench_generation.py --model smollm2-135m-instruct --batch 32 --prompt 256 --new_tokens 256

The logic lives in rlhf_ds/benchmarks.py.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("bench-generation")
