"""Time Hugging Face TRL (GRPOTrainer, DPOTrainer, from PyPI) on rlhf_ds's benchmark workload.

    /work/peers-venv/bin/python benchmarks/peers/trl/bench_trl.py --algo grpo|dpo [--stages 2,3] [--worlds 1,2] \
        [--steps 10] [--warmup 2] [--reward fn|model] [--ds3_gather on[,off]] [--precompute_ref off[,on]]

Run it with the peers venv's python (TRL and rlhf_ds installed there, see README.md). The driver starts one `torchrun`
per (world size, ZeRO stage, variant) with OMP_NUM_THREADS=1, prints each configuration's JSON line on stderr as it
finishes and one summary line on stdout, like rlhf_ds's `launch/bench_ppo.py`.

  grpo  one optimizer step of TRL's GRPOTrainer: per process 4 prompts x 4 completions (plain HF generate, 64 new
        tokens with EOS suppressed), a Python reward function (--reward fn) or a reward model on the policy's
        backbone (--reward model), no reference model (beta 0), one iteration per generation;
  dpo   one optimizer step of TRL's DPOTrainer: per process 4 pairs of a 64-token prompt and 64-token answers,
        sigmoid loss, beta 0.1, a frozen copy of the policy as reference (TRL's default for ref_model=None).

Workload (rlhf_ds.benchmarks): the random OPT-style model of `workload_model` (vocab 8192, hidden 256, 6 layers);
precision from rlhf_ds's resolver; DeepSpeed configs are rlhf_ds's own shipped files (HF fills their "auto" values);
2 warm-up steps, then the median of 10, each step between barriers (a TrainerCallback). TRL itself is used as
published: the harness only builds its inputs, and wraps GRPO's generation call to time it and to check lengths.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(tempfile.gettempdir()) / "rlhf_ds_bench"  # the same folder (and model) rlhf_ds's benchmark uses
PROMPT, ANSWER, ROWS, GROUP = 64, 64, 4, 4  # tokens per prompt / answer, prompts (pairs) per process, GRPO group


# ------------------------------------------------------------------------------------------------------ inputs


class RandomText:
    """Random token sequences as text that tokenises back to exactly those ids (TRL's trainers take text).

    The pool is every id of rlhf_ds's random range [10, 8182) whose token is a space plus ASCII letters and encodes
    alone to itself (1631 of the 8172 with the benchmark's tokenizer). The tokenizer's ByteLevel pre-tokenizer splits
    before each space, so any sequence of pool tokens joined as text encodes back to the same ids; `text` checks it."""

    def __init__(self, tokenizer, seed: int):
        ids = range(10, 8182)
        words = {i: t[1:] for i, t in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)))
                 if t.startswith("Ġ") and t[1:].isascii() and t[1:].isalpha()}
        self.words = {i: w for i, w in words.items() if tokenizer(" " + w)["input_ids"] == [i]}
        self.pool, self.tokenizer, self.rng = sorted(self.words), tokenizer, random.Random(seed)

    def text(self, n: int) -> str:
        ids = [self.rng.choice(self.pool) for _ in range(n)]
        text = "".join(" " + self.words[i] for i in ids)
        assert self.tokenizer(text)["input_ids"] == ids, "text must tokenise to the sampled ids"
        return text


def reward_len(completions, **kwargs) -> list[float]:
    """GRPO's default reward (--reward fn): a cheap Python function of the completion text."""
    return [float(len(c) % 7) for c in completions]


def reward_dir(policy: Path) -> Path:
    """GRPO's --reward model: rlhf_ds's reward folder holds its own scalar-head format, which TRL cannot read, so
    build once an HF OPTForSequenceClassification on the same backbone (the policy's weights and a random `score`
    head, seed 1) that TRL loads as a reward model. Like rlhf_ds's reward model: the OPT backbone + a linear head
    reading the last non-pad token. The head's values do not change the work timed."""
    from transformers import AutoTokenizer, OPTForSequenceClassification

    out = ROOT / "trl_reward"
    if not (out / "config.json").exists():
        torch.manual_seed(1)
        model = OPTForSequenceClassification.from_pretrained(str(policy), num_labels=1, dtype=torch.float32)
        model.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(policy)).save_pretrained(str(out))
    return out


# ------------------------------------------------------------------------------------------------- set-up, timing


def ds_config(stage: int) -> dict:
    """rlhf_ds's own shipped DeepSpeed config for a trainable engine (ds_configs/zero{2,3}.json) with the two values
    rlhf_ds's `build_ds_config` sets itself rather than from "auto": the ZeRO-3 persistence threshold (its default
    1e4; HF's "auto" would give 10 x hidden) and, on a CPU, torch's fused AdamW (`torch_adam`, `fused`) instead of
    DeepSpeed's compiled Adam ops. HF's Trainer fills the other "auto"s (micro batch, accumulation, clipping,
    bf16/fp16, lr/betas/eps/weight decay) from the TrainingArguments, as rlhf_ds fills them from its flags."""
    from rlhf_ds.engines.ds_config import on_cpu, read_config, shipped_config_path

    cfg = read_config(shipped_config_path(stage, offload=False, trainable=True))
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 10000
    if on_cpu():
        cfg["optimizer"]["params"].update(torch_adam=True, fused=True)
    return cfg


def common_args(algo: str, stage: int, steps: int, precision: str) -> dict:
    """Arguments shared by both trainers' configs. TRL's own defaults differ from HF's in two places that change the
    work: gradient checkpointing (TRL: on) is switched off, as in rlhf_ds's benchmark; bf16 (TRL: on) follows
    rlhf_ds's resolver. lr 1e-5, linear schedule, AdamW betas (0.9, 0.999), clipping 1.0 as on rlhf_ds's side.

    Dropout: the benchmark's OPT config has dropout 0.1, applied as `nn.functional.dropout(p=self.dropout)`. TRL's
    `disable_dropout` only zeroes `nn.Dropout` modules, of which OPT has none, so it would leave that dropout on in
    the policy's training forward. rlhf_ds zeroes it (its `disable_dropout` also clears float rates), so the model
    is loaded with `dropout=0.0` through TRL's `model_init_kwargs` (a config override in `from_pretrained`); the
    DPO reference is built from the same kwargs."""
    import torch.distributed as tdist

    from rlhf_ds.engines.ds_config import on_cpu

    return {"use_cpu": on_cpu(),  # HF refuses bf16 on a machine without a GPU unless told it is a CPU run
            "output_dir": str(ROOT / f"trl-{algo}-zero{stage}-{tdist.get_world_size()}"), "max_steps": steps,
            "learning_rate": 1e-5, "lr_scheduler_type": "linear", "bf16": precision == "bf16", "fp16": False,
            "gradient_checkpointing": False, "deepspeed": ds_config(stage), "ddp_backend": "gloo",
            "report_to": "none", "logging_steps": 10 ** 6, "save_strategy": "no", "disable_tqdm": True, "seed": 1234,
            "dataloader_num_workers": 0, "model_init_kwargs": {"dropout": 0.0}}


def step_timer():
    """A TrainerCallback timing each optimizer step between two barriers: on_step_begin comes after the batch is
    fetched, on_step_end after the optimizer step (GRPO's generation and scoring happen inside, in training_step)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            torch.distributed.barrier()
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            torch.distributed.barrier()
            self.seconds.append(time.time() - self.t0)

    return StepTimer()


# ---------------------------------------------------------------------------------------------------------- GRPO


def grpo_worker(policy: Path, stage: int, steps: int, warmup: int, precision: str, tokenizer,
                reward: Path | None, ds3_gather: bool) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_ds.benchmarks import FixedLengthSampling

    world = torch.distributed.get_world_size()
    # one epoch of unique prompts: each step takes 4 per process (TRL's sampler repeats each num_generations times)
    words = RandomText(tokenizer, seed=0)
    dataset = Dataset.from_dict({"prompt": [words.text(PROMPT) for _ in range(ROWS * world * (warmup + steps))]})
    # rlhf_ds's benchmark sampling: temperature 1, no top-k/top-p, EOS suppressed, min_new_tokens 64 (so every
    # completion has 64 tokens); TRL lets generation_kwargs override its own GenerationConfig fields
    sampling = FixedLengthSampling(max_new_tokens=ANSWER, eos_token_ids=[tokenizer.eos_token_id],
                                   pad_token_id=tokenizer.pad_token_id).generation_kwargs()
    config = GRPOConfig(**common_args("grpo", stage, warmup + steps, precision),
                        per_device_train_batch_size=ROWS * GROUP,  # completions, in TRL's counting
                        num_generations=GROUP, max_completion_length=ANSWER, temperature=1.0, top_p=1.0, top_k=0,
                        beta=0.0, num_iterations=1, disable_dropout=True, use_vllm=False, generation_kwargs=sampling,
                        ds3_gather_for_generation=ds3_gather)
    timer = step_timer()
    trainer = GRPOTrainer(model=str(policy), reward_funcs=reward_len if reward is None else str(reward), args=config,
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    reward_widths = []  # --reward model: TRL re-tokenises prompt + completion text for it (padded right)
    if reward is not None:
        trainer.reward_funcs[0].register_forward_pre_hook(
            lambda module, args, kwargs: reward_widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)

    # TRL's generation call (its plain-HF path: left-pad, under ZeRO-3 gather the parameters, `generate`, mask after
    # EOS), wrapped: timed, and the prompt and completion lengths checked
    generate, gen_seconds = trainer._generate_single_turn, []

    def timed_generate(prompt_ids, *args, **kwargs):
        assert len(prompt_ids) == ROWS * GROUP and all(len(p) == PROMPT for p in prompt_ids), "64-token prompts"
        t0 = time.time()
        out = generate(prompt_ids, *args, **kwargs)
        gen_seconds.append(time.time() - t0)
        assert all(len(c) == ANSWER for c in out[0]), "every completion must have 64 tokens"
        return out

    trainer._generate_single_turn = timed_generate
    trainer.train()
    assert len(timer.seconds) == len(gen_seconds) == warmup + steps
    return {"prompts_per_rank": ROWS, "samples_per_prompt": GROUP, "loss_type": trainer.loss_type,
            "ds3_gather_for_generation": config.ds3_gather_for_generation,
            "reward": "python: len(completion) % 7" if reward is None else "model: opt-7m sequence classification",
            **({"reward_input_width": statistics.median(reward_widths)} if reward is not None else {}),
            "generation_s": round(statistics.median(gen_seconds[warmup:]), 3),
            "step_s": round(statistics.median(timer.seconds[warmup:]), 3)}


# ----------------------------------------------------------------------------------------------------------- DPO


def dpo_worker(policy: Path, stage: int, steps: int, warmup: int, precision: str, tokenizer,
               precompute_ref: bool) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    world = torch.distributed.get_world_size()
    # pairs of text: a 64-token prompt and two answers of 63 random tokens + EOS (TRL appends EOS to answers that
    # lack it; given here, so every answer has 64 tokens and the 128-token rows need no truncation)
    words, eos = RandomText(tokenizer, seed=0), tokenizer.eos_token
    n = ROWS * world * (warmup + steps)
    rows = [(words.text(PROMPT), words.text(ANSWER - 1) + eos, words.text(ANSWER - 1) + eos) for _ in range(n)]
    dataset = Dataset.from_dict(dict(zip(("prompt", "chosen", "rejected"), map(list, zip(*rows)))))
    config = DPOConfig(**common_args("dpo", stage, warmup + steps, precision), per_device_train_batch_size=ROWS,
                       max_length=PROMPT + ANSWER, beta=0.1, loss_type=["sigmoid"], disable_dropout=True,
                       precompute_ref_log_probs=precompute_ref)
    timer = step_timer()
    trainer = DPOTrainer(model=str(policy), args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    for row in trainer.train_dataset.select(range(8)):  # TRL's own tokenisation of the pairs
        assert (len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])) == (PROMPT, ANSWER, ANSWER)
    trainer.train()
    assert len(timer.seconds) == warmup + steps
    return {"pairs_per_rank": ROWS, "loss_type": "sigmoid", "precompute_ref_log_probs": precompute_ref,
            "step_s": round(statistics.median(timer.seconds[warmup:]), 3)}


# ------------------------------------------------------------------------------------------------- worker/driver


def trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


def worker(args) -> None:
    import deepspeed
    import transformers

    from rlhf_ds import dist
    from rlhf_ds.benchmarks import machine, workload_model
    from rlhf_ds.engines.precision import resolve_precision

    transformers.logging.set_verbosity_warning()
    # the process group before TRL's Accelerator, which reuses it: gloo on CPU (no oneCCL here), as rlhf_ds uses
    deepspeed.init_distributed(dist_backend="gloo" if dist.device().type == "cpu" else None)
    with dist.main_process_first():
        policy, _ = workload_model(ROOT)  # rlhf_ds's benchmark model (built once, shared with rlhf_ds's bench)
    precision = resolve_precision(bf16=True, model_dir=policy)  # as rlhf_ds's --bf16 decides it
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(policy))
    if args.algo == "grpo":
        reward = None
        if args.reward == "model":
            with dist.main_process_first():
                reward = reward_dir(policy)  # before TRL's config: under ZeRO-3 it would load inside zero.Init
        figures = grpo_worker(policy, args.zero_stage, args.steps, args.warmup, precision.name, tokenizer, reward,
                              args.ds3_gather == "on")
    else:
        figures = dpo_worker(policy, args.zero_stage, args.steps, args.warmup, precision.name, tokenizer,
                             args.precompute_ref == "on")
    result = {"system": "trl", "trl_version": trl_version(), "algo": args.algo, "zero_stage": args.zero_stage,
              "world_size": dist.world_size(), **figures, **precision.record(), **machine()}
    if dist.is_main():
        Path(args.result_file).write_text(json.dumps(result))


def variants(args, stage: int) -> list[tuple[str, str]]:
    """(precompute_ref, ds3_gather) per run: DPO's precompute_ref_log_probs modes; GRPO's ds3_gather_for_generation
    modes, which only act under ZeRO-3 (under ZeRO-2 one run, with the first mode)."""
    if args.algo == "dpo":
        return [(pre, "on") for pre in args.precompute_ref.split(",")]
    gathers = args.ds3_gather.split(",")
    return [("off", gather) for gather in (gathers if stage == 3 else gathers[:1])]


def driver(args) -> None:
    from rlhf_ds.dist import free_port

    results = []
    for world in [int(w) for w in args.worlds.split(",")]:
        for stage in [int(s) for s in args.stages.split(",")]:
            for pre, gather in variants(args, stage):
                with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                    result_file = f.name
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
                       "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", "--algo", args.algo,
                       "--zero_stage", str(stage), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--precompute_ref", pre, "--reward", args.reward, "--ds3_gather", gather, "--result_file",
                       result_file]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TQDM_DISABLE": "1"}
                env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                results.append(json.loads(Path(result_file).read_text()))
                Path(result_file).unlink()
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    workload = ("opt-7m, 4 prompts x 4 completions per process, 64-token prompts, 64 new tokens"
                if args.algo == "grpo" else "opt-7m, 4 pairs x (64 prompt + 64 answer tokens) per process")
    print(json.dumps({"bench": f"trl_{args.algo}_step", "system": "trl", "trl_version": trl_version(),
                      "workload": f"{workload}, rlhf_ds --bf16 precision, OMP_NUM_THREADS=1, median of steps after "
                                  "warm-up", "steps": args.steps, "warmup": args.warmup, "results": results}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=("grpo", "dpo"), default="grpo")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precompute_ref", default="off",
                        help="DPO: precompute_ref_log_probs off, on, or both (off,on); on = no reference forward "
                             "in the step (TRL computes the reference log-probs before training, untimed)")
    parser.add_argument("--reward", choices=("fn", "model"), default="fn",
                        help="GRPO: score with a Python function (fn, default) or with a reward model on the "
                             "policy's backbone (model; the work rlhf_ds's GRPO step does)")
    parser.add_argument("--ds3_gather", default="on",
                        help="GRPO under ZeRO-3: ds3_gather_for_generation on (TRL's default: gather the whole model "
                             "once per generation, like rlhf_ds's hybrid engine), off (per-layer gathers through "
                             "ZeRO's hooks on every decode step, like rlhf_ds's --hybrid_engine off), or on,off")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero_stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--result_file", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
