#!/usr/bin/env python
"""PPO step time on a fixed tiny workload (see rlhf_ds/benchmarks.py): ZeRO-2 and ZeRO-3, 1 and 2 processes,
with our hybrid engine and without it. Prints one JSON line (progress on stderr).

    python launch/bench_ppo.py                          # the whole matrix (about 6 minutes on 2 CPU cores)
    python launch/bench_ppo.py --stages 3 --worlds 2 --hybrid ours
"""
import argparse
import json

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--hybrid", default="off,ours", help="hybrid engine modes to compare")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero_stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--hybrid_engine", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--result_file", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from rlhf_ds import dist
        from rlhf_ds.benchmarks import bench_ppo_worker

        result = bench_ppo_worker(args.zero_stage, args.hybrid_engine, args.steps, args.warmup)
        if dist.is_main():
            with open(args.result_file, "w") as f:
                json.dump(result, f)
        dist.shutdown(0)
    from rlhf_ds.benchmarks import run_ppo_matrix

    summary = run_ppo_matrix([int(s) for s in args.stages.split(",")], [int(w) for w in args.worlds.split(",")],
                             args.hybrid.split(","), args.steps, args.warmup)
    print(json.dumps(summary), flush=True)
