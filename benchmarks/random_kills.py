#!/usr/bin/env python
"""Kill a 2-process PPO run (ZeRO-3 actor with LoRA, ZeRO-2 critic, a checkpoint every step) at random moments with
SIGKILL to the launcher and every rank, rerun the same command until it finishes, and compare its per-step metrics and
final weights with a run that was never interrupted. Prints one JSON line: trials, kills, runs that lost anything.

    python benchmarks/random_kills.py --trials 20          # about 15 minutes on 2 CPU cores
    python benchmarks/random_kills.py --trials 1 --seed 3  # what tests/test_faults.py runs
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("reward", "reward_normalized", "kl", "kl_coef", "policy_loss", "value_loss", "entropy", "approx_kl",
            "response_length")
WEIGHTS = ("actor/adapter_model.safetensors", "critic/adapter_model.safetensors", "critic/value_head.safetensors")


def command(model: Path, out: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), str(REPO / "launch" / "train_ppo.py"), "--model_name_or_path", str(model),
            "--do_train", "--dataset", "alpaca_gpt4_zh", "--max_samples", "64", "--output_dir", str(out),
            "--reward_fn", str(REPO / "tests" / "reward_fns.py") + ":ascii_letters", "--finetuning_type", "lora",
            "--lora_target", "q_proj,v_proj", "--actor_zero_stage", "3", "--critic_zero_stage", "2",
            "--stage3_param_persistence_threshold", "0", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--ppo_epochs", "2", "--max_steps", "5", "--save_steps", "1",
            "--logging_steps", "1", "--learning_rate", "5e-3", "--max_new_tokens", "6", "--max_prompt_length", "32",
            "--disable_tqdm", "--target_kl", "1", "--kl_horizon", "100"]


def run(cmd: list[str], kill_after: float | None = None) -> int:
    """Run to the end (returns the exit code) or SIGKILL the launcher and every rank after kill_after seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, cwd=REPO)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own (torch 2.x), so killing the launcher's process group
        # would leave the ranks running: kill the whole tree, as a node failure would
        import psutil

        launcher = psutil.Process(proc.pid)
        for p in [launcher, *launcher.children(recursive=True)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
        # a killed rank cannot unlink DeepSpeed's shared-memory all-reduce segment (67 MB each): do it for it
        port = cmd[cmd.index("--master_port") + 1]
        for segment in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
            segment.unlink(missing_ok=True)
        return -9
    if proc.returncode not in (0, -9):
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.read()[-3000:]}")
    return proc.returncode


def same(a: Path, b: Path) -> list[str]:
    """What differs between two finished runs: metrics of a step, missing or extra steps, weights."""
    import torch
    from safetensors.torch import load_file

    def rows(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if '"kind": "train"' in line]

    diffs = []
    ra, rb = rows(a), rows(b)
    if [r["step"] for r in ra] != [r["step"] for r in rb]:
        diffs.append(f"steps {[r['step'] for r in rb]}")
    for x, y in zip(ra, rb):
        diffs += [f"step {x['step']} {k}" for k in COMPARED if abs(x[k] - y[k]) > 1e-5 + 1e-5 * abs(x[k])]
    for rel in WEIGHTS:
        wa, wb = load_file(str(a / rel)), load_file(str(b / rel))
        diffs += [f"{rel}:{k}" for k in wa if not torch.allclose(wa[k], wb.get(k, wa[k] + 1), atol=1e-5, rtol=0)]
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a model folder (default: a tiny Llama built here)")
    args = parser.parse_args()
    from rlhf_ds.benchmarks import machine
    from rlhf_ds.dist import free_port
    from rlhf_ds.models import tiny

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="rlhf_ds_kills_"))
    if args.model:
        model = Path(args.model)
    else:
        tiny.train_tokenizer(root / "tok")
        model = tiny.make_model(root / "model", root / "tok", "llama")
    straight = root / "straight"
    t0 = time.time()
    run(command(model, straight, free_port()))
    duration = straight_s = time.time() - t0
    results = []
    for trial in range(args.trials):
        out = root / f"trial-{trial}"
        while True:  # the first kill, anywhere in a run: set-up, a step, a save
            moment, t0 = rng.uniform(1.0, duration), time.time()
            if run(command(model, out, free_port()), kill_after=moment) == -9:
                break
            # it finished before the kill (runs after the first are faster: caches are warm): draw again within
            # this run's length, from scratch
            duration = time.time() - t0
            shutil.rmtree(out)
        kills, moments = 1, [round(moment, 1)]
        while not (out / "train_results.json").is_file():  # not killed after it had finished, before it exited
            moment = None if kills >= 2 else rng.uniform(1.0, duration)  # at most two kills, then run to the end
            if run(command(model, out, free_port()), kill_after=moment) != -9:
                break
            kills += 1
            moments.append(round(moment, 1))
        lost = same(straight, out)
        results.append({"trial": trial, "killed_at_s": moments, "lost": lost})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    shutil.rmtree(root)  # the runs this made (a temporary folder of its own)
    print(json.dumps({"bench": "random_kills", "run": "2-process PPO, ZeRO-3 LoRA actor, ZeRO-2 critic, "
                                                       "a checkpoint every step, 5 steps",
                      "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True).stdout.strip(),
                      "command": " ".join(["python", *sys.argv]), **machine(),
                      "uninterrupted_run_s": round(straight_s, 1), "trials": len(results),
                      "kills": sum(len(r["killed_at_s"]) for r in results),
                      "trials_that_lost_anything": sum(bool(r["lost"]) for r in results), "results": results}))


if __name__ == "__main__":
    main()
