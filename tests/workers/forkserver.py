"""The suite's fork server (conftest.forked_cli): imports every rlhf_ds stage once, then runs each requested
`python launch/<script> ARGS` in a child forked from this warm process.

A run that refuses its input spends nearly all its time importing torch, transformers, datasets and DeepSpeed
(about 3.5 s on one core, every time); forked from here it starts with all of them loaded and takes a fraction of
a second. The child runs the launch script itself as `__main__` (runpy), so the code path from the script to the
exit code is the user's; only the imports happened earlier. Nothing has run a parallel region or started a thread
here before the fork, so the children inherit no lock held by a thread that no longer exists.

Protocol, one JSON line each way: a batch {"runs": [{script, args, stdout, stderr, env, timeout}], "at_once": N}
in, the list of exit codes out (a negative number is the signal that ended the child, as in subprocess).
"""
import json
import os
import runpy
import signal
import sys
import traceback


def preload() -> None:
    from rlhf_ds import cli

    for name in cli.COMMANDS:  # every stage's module, with everything it imports at module level
        cli.resolve(name)
    # what the stages import inside functions (peft alone pulls in accelerate: 4.6 s of a run's start-up), and the
    # transformers modules its lazy loader would otherwise import on first use
    import datasets  # noqa: F401
    import deepspeed.runtime.zero.linear  # noqa: F401
    import deepspeed.runtime.zero.partition_parameters  # noqa: F401
    import deepspeed.utils.tensor_fragment  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch.utils.data  # noqa: F401
    import transformers.generation.logits_process  # noqa: F401
    import transformers.integrations.deepspeed  # noqa: F401
    import transformers.trainer_pt_utils  # noqa: F401
    import transformers.trainer_utils  # noqa: F401
    from deepspeed.accelerator import get_accelerator
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer,  # noqa: F401
                              GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM)

    get_accelerator()


def child(run: dict) -> None:
    """In the forked child: become `python launch/<script> ARGS` with its output going to the given files."""
    code = 1
    try:
        for fd, path in ((1, run["stdout"]), (2, run["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's request pipe
        os.environ.update(run.get("env") or {})
        signal.alarm(int(run.get("timeout", 300)))  # a hang ends in SIGALRM, reported as -14
        sys.argv = [run["script"], *run["args"]]
        runpy.run_path(run["script"], run_name="__main__")
        code = 0
    except SystemExit as stop:  # sys.exit(None | int | message), as the interpreter treats it
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:  # what the interpreter would print and exit 1 with
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_batch(runs: list[dict], at_once: int) -> list[int]:
    codes: list[int | None] = [None] * len(runs)
    waiting, running = list(enumerate(runs)), {}
    while waiting or running:
        while waiting and len(running) < at_once:
            index, run = waiting.pop(0)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                child(run)
            running[pid] = index
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    return codes


def main() -> None:
    preload()
    print(json.dumps("ready"), flush=True)
    for line in sys.stdin:
        batch = json.loads(line)
        print(json.dumps(run_batch(batch["runs"], batch.get("at_once", 2))), flush=True)


if __name__ == "__main__":
    main()
