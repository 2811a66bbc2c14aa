#!/usr/bin/env python
"""Generation throughput under ZeRO-3: plain engine.module.generate vs our hybrid engine vs Hugging Face without
DeepSpeed, same model, prompts and settings, in one run. Prints one JSON line.

    deepspeed --num_gpus 2 launch/bench_generation.py                      # CPU: 2 processes, opt-7m
    deepspeed --num_gpus 1 launch/bench_generation.py --model smollm2-135m-instruct --batch 32 --prompt 256 --new_tokens 256
"""
import argparse
import json

from rlhf_ds import dist
from rlhf_ds.benchmarks import bench_generation

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-7m", help="opt-7m (random, built here), a folder or a built-in name")
    parser.add_argument("--batch", type=int, default=4, help="prompts per rank")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per prompt (EOS suppressed)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of bf16")
    parser.add_argument("--stage3_param_persistence_threshold", type=int, default=10000)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    result = bench_generation(args.model, args.batch, args.prompt, args.new_tokens, args.repeats, not args.fp32,
                              args.stage3_param_persistence_threshold)
    if dist.is_main():
        print(json.dumps(result), flush=True)
    dist.shutdown(0)
