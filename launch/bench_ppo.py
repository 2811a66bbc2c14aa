#!/usr/bin/env python
"""One online RL step on a fixed tiny workload (see rlhf_ds/benchmarks.py): ZeRO-2 and ZeRO-3, 1 and 2 processes,
PPO or GRPO, with our hybrid engine and without it. Prints one JSON line (progress on stderr).

    python launch/bench_ppo.py                          # the PPO matrix (about 6 minutes on 2 CPU cores)
    python launch/bench_ppo.py --algo grpo --stages 3 --worlds 2 --hybrid on

The logic lives in rlhf_ds/benchmarks.py.
"""
from rlhf_ds.cli import run_command

if __name__ == "__main__":
    run_command("bench-ppo")
