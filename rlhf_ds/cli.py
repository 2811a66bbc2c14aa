"""Running a stage as a command: `rlhf-ds <command> ...` (the console script), `python launch/<script>.py ...`
and `python -m rlhf_ds.cli <command> ...` all come here. A user-fixable problem is one line and exit code 2, never a
traceback; a lost rank exit code 3; a stop on SIGTERM/SIGUSR1 after its checkpoint exit code 75.
"""
from __future__ import annotations

import importlib
import os
import shlex
import sys
from typing import Callable

from rlhf_ds.errors import EXIT_LOST_RANK, EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError

# command -> (module:function, the launch/ script that runs it, what it does)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train-sft": ("rlhf_ds.trainers.sft:main", "train_sft.py", "supervised fine-tuning"),
    "train-rm": ("rlhf_ds.trainers.rm:main", "train_rm.py", "a reward model from ranked answer pairs"),
    "eval-rm": ("rlhf_ds.trainers.rm:evaluate_main", "eval_rm.py", "score a preference file with a saved model"),
    "train-ppo": ("rlhf_ds.trainers.online.trainer:main_ppo", "train_ppo.py", "PPO: actor, critic, reference, reward"),
    "train-grpo": ("rlhf_ds.trainers.online.trainer:main_grpo", "train_grpo.py",
                   "critic-free online RL (GRPO, RLOO, REINFORCE++)"),
    "train-dpo": ("rlhf_ds.trainers.dpo:main", "train_dpo.py", "DPO, IPO, SimPO, ORPO: a policy from preference pairs"),
    "recipe": ("rlhf_ds.recipe:main", "run_recipe.py", "the whole recipe: SFT -> RM -> PPO -> report"),
    "judge": ("rlhf_ds.judge:main", "", "compare policies' answers to held-out prompts with a reward model"),
    "export": ("rlhf_ds.export:main", "export.py", "a stage's output as one plain Hugging Face folder"),
    "chat": ("rlhf_ds.inference:main", "chat.py", "talk to a trained policy"),
    "bench-generation": ("rlhf_ds.benchmarks:main_generation", "bench_generation.py",
                         "generation throughput: ZeRO-3 plain vs the hybrid engine vs Hugging Face"),
    "bench-ppo": ("rlhf_ds.benchmarks:main_ppo", "bench_ppo.py", "one online RL step on a fixed tiny workload"),
    "preflight": ("rlhf_ds.preflight:main", "", "check every host of a hostfile or SLURM allocation"),
}

# Flags of the deepspeed launcher and torchrun: after the script they reach the stage, which cannot use them.
DEEPSPEED_FLAGS = ("--num_gpus", "--num_nodes", "--hostfile", "--include", "--exclude", "--master_port",
                   "--master_addr", "--launcher", "--num_accelerators", "--bind_cores_to_rank")
TORCHRUN_FLAGS = ("--nproc_per_node", "--nproc-per-node", "--nnodes", "--node_rank", "--node-rank",
                  "--rdzv_backend", "--rdzv_endpoint")


def misplaced_launcher_flags(argv: list[str], script: str) -> str | None:
    """One line showing the right order when launcher flags were written after the script, else None."""
    launcher_flags = DEEPSPEED_FLAGS + TORCHRUN_FLAGS
    moved, rest, i = [], [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in launcher_flags:
            takes_value = "=" not in argv[i] and name != "--bind_cores_to_rank" and i + 1 < len(argv) \
                and not argv[i + 1].startswith("--")
            moved += argv[i:i + 2] if takes_value else argv[i:i + 1]
            i += 2 if takes_value else 1
        else:
            rest.append(argv[i])
            i += 1
    if not moved:
        return None
    names = [m for m in moved if m.startswith("--")]
    launcher = "torchrun" if any(n.split("=")[0] in TORCHRUN_FLAGS for n in names) else "deepspeed"
    command = " ".join([launcher, *map(shlex.quote, moved), script, *map(shlex.quote, rest)])
    return (f"{', '.join(n.split('=')[0] for n in names)} belong(s) to the {launcher} launcher and go(es) before "
            f"the script: {command}")


def resolve(name: str) -> Callable[[list[str] | None], int | None]:
    target = COMMANDS[name][0]
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def run_command(name: str, argv: list[str] | None = None, script: str | None = None) -> None:
    """Run one command with the exit-code and one-line-error behaviour of every rlhf_ds CLI."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if name != "preflight":
        problem = misplaced_launcher_flags(argv, script or f"launch/{COMMANDS[name][1]}")
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            os._exit(EXIT_USER_ERROR)
    run_cli(lambda args: resolve(name)(args), argv)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a stage's main; turn a UserError into one readable line and a non-zero exit on this rank.

    The process exits with os._exit so that a failing rank does not wait in a collective or in the
    interpreter's teardown; the launcher (deepspeed / torchrun) then stops the other ranks.
    """
    from rlhf_ds import dist

    try:
        rc = main(argv) or 0
    except UserError as err:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_USER_ERROR)
    except Preempted as stop:
        if dist.is_main():
            print(f"stopped: {stop}; run the same command again to resume", file=sys.stderr, flush=True)
        dist.shutdown(EXIT_PREEMPTED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    except Exception as err:
        _exit_if_a_rank_is_lost(err)
        raise
    dist.shutdown(rc)


def _exit_if_a_rank_is_lost(err: Exception) -> None:
    """A failed or timed-out collective usually means another rank died or hangs: say which, and leave at once
    instead of printing a traceback from deep inside torch.distributed (and instead of hanging)."""
    from rlhf_ds import dist

    if dist.world_size() == 1 or not _looks_distributed(err):
        return
    lost = dist.lost_ranks()
    me = f"rank {dist.rank()}"
    if lost is None:
        msg = (f"{me}: lost contact with the rendezvous store (held by rank 0 or the first node's launcher): that "
               f"process is gone")
    elif lost:
        msg = f"{me}: lost {', '.join(lost)}: it stopped responding (died, killed, or hung)"
    else:
        return
    print(f"error: {msg}. This rank stops now ({type(err).__name__}: {str(err).splitlines()[0][:200]}). See that "
          f"rank's own log for why; a run with checkpoints continues with the same command.", file=sys.stderr,
          flush=True)
    os._exit(EXIT_LOST_RANK)


def _looks_distributed(err: Exception) -> bool:
    import torch.distributed as tdist

    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, tdist.DistError) or any(
        word in text for word in ("gloo", "nccl", "c10d", "connection closed by peer", "connection reset", "timed out"))


def main(argv: list[str] | None = None) -> None:
    """`rlhf-ds <command> [flags]`: every stage and tool as one command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {what}" for name, (_, _, what) in COMMANDS.items()]
        print("usage: rlhf-ds <command> [flags]   (rlhf-ds <command> --help for its flags)\n\ncommands:\n"
              + "\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        return
    run_command(argv[0], argv[1:], script=f"$(which rlhf-ds) {argv[0]}")


if __name__ == "__main__":
    main()
