"""A whole path in one command (launch/run_recipe.py): `--algo ppo` SFT -> reward model -> PPO; `--algo dpo`
SFT -> reward model -> DPO -> the SFT and DPO answers judged by that reward model; `--algo grpo` GRPO on seeded
arithmetic problems with the math reward. Each ends with report.md.

Each stage runs as its own process through the chosen launcher (`python`, `deepspeed --num_gpus N`, `torchrun
--nproc_per_node N`), exactly as a user would run it by hand, with its output shown as it goes and kept in
OUTPUT/logs/. A stage whose folder already holds a finished run is skipped, so an interrupted recipe continues
where it stopped. The instruction data is split once into disjoint files: SFT trains on one part, PPO draws its
prompts (and the judge its held-out prompts) from the other part.
"""
from __future__ import annotations

import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_ds.args import DEFAULT_DATASET_DIR, REPO_ROOT
from rlhf_ds.data.registry import resolve
from rlhf_ds.errors import UserError

DEFAULT_RECIPE_MODEL = "qwen2.5-coder-0.5b-instruct"

# Sizes that finish the recipe in about 20 minutes on a 2-core CPU machine (measured; see docs/recipe.md), per model
# and per precision: where the processor has no native bf16 the stages run in fp32, about twice as slow per token,
# so the fp32 profile trains on less and makes one PPO update per rollout (which also fuses the old log-probs into
# the first training forward). Qwen2.5-Coder-0.5B reads Chinese and its answers can be judged by eye, but each step
# costs 2.5-3x SmolLM2's. The reward model trains debiased (train_rm.py's default: as many padded pairs as real
# ones, then the length correction), so it gets fewer real pairs to stay in time, and is scored on the first rm_eval
# pairs of comparison_gpt4_zh_heldout: the first 44 hold 22 where the better answer is the shorter one, enough for
# the report to read a verdict from (it needs 20).
_DPO_GRPO = dict(dpo_pairs=32, dpo_eval=32, dpo_epochs=1, judge_prompts=16, grpo_steps=20, grpo_prompts=4,
                 grpo_samples=4, grpo_max_new_tokens=32, grpo_overlong_buffer=0)
# GRPO on the default model in bf16: unbounded, its answers grew by 80% into the 32-token cap as it learnt to write the
# calculation; with 40 tokens, free up to 26 and DAPO's overlong penalty beyond, it learnt as much with +14%
# (docs/recipe.md, "Bounding the length"). Not measured in fp32, whose profile keeps the unbounded 32 tokens.
_GRPO_BOUNDED = dict(grpo_max_new_tokens=40, grpo_overlong_buffer=14)
PROFILES: dict[str, dict[str, dict[str, float]]] = {
    "qwen2.5-coder-0.5b-instruct": {
        "bf16": dict(sft_examples=96, sft_eval=16, rm_pairs=48, rm_eval=44, ppo_steps=8, ppo_eval_prompts=8,
                     ppo_epochs=2, max_length=256, **{**_DPO_GRPO, **_GRPO_BOUNDED}),
        "fp32": dict(sft_examples=80, sft_eval=16, rm_pairs=24, rm_eval=44, ppo_steps=8, ppo_eval_prompts=8,
                     ppo_epochs=1, max_length=192, **{**_DPO_GRPO, "dpo_pairs": 16, "grpo_steps": 12})},
    "smollm2-135m-instruct": {
        "bf16": dict(sft_examples=256, sft_eval=32, rm_pairs=240, rm_eval=60, ppo_steps=16, ppo_eval_prompts=16,
                     ppo_epochs=2, max_length=256, **_DPO_GRPO),
        "fp32": dict(sft_examples=160, sft_eval=32, rm_pairs=160, rm_eval=40, ppo_steps=12, ppo_eval_prompts=16,
                     ppo_epochs=1, max_length=192, **_DPO_GRPO)},
}
DEFAULT_PROFILE = PROFILES[DEFAULT_RECIPE_MODEL]


# The stages of each path, in order: PPO (the original recipe), DPO (judged by the reward model the recipe also
# trains), and GRPO with a verifiable reward (no SFT, no reward model).
PATHS = {"ppo": ("sft", "rm", "ppo"), "dpo": ("sft", "rm", "dpo", "judge"), "grpo": ("grpo",)}
SCRIPTS = {"sft": "train_sft.py", "rm": "train_rm.py", "ppo": "train_ppo.py", "dpo": "train_dpo.py",
           "grpo": "train_grpo.py", "judge": ""}
COMMAND_OF = {"sft": "train-sft", "rm": "train-rm", "ppo": "train-ppo", "dpo": "train-dpo", "grpo": "train-grpo",
              "judge": "judge"}
FINISHED = {"sft": "train_results.json", "rm": "value_head.json", "ppo": "train_results.json",
            "dpo": "train_results.json", "grpo": "train_results.json", "judge": "judge.json"}
WHAT = {"sft": "supervised fine-tuning", "rm": "reward model", "ppo": "PPO", "dpo": "DPO",
        "judge": "the SFT and the DPO answers judged by the reward model", "grpo": "GRPO with the math reward"}


@dataclass
class RecipeArguments:
    algo: str = field(default="ppo", metadata={"help": "ppo (SFT -> reward model -> PPO), dpo (SFT -> reward model "
                                                       "-> DPO, judged by that reward model) or grpo (GRPO on "
                                                       "arithmetic problems with the math reward)."})
    model: str = field(default=DEFAULT_RECIPE_MODEL, metadata={"help": "Base model for every stage."})
    output_dir: str = field(default="output/recipe", metadata={"help": "One folder per stage, logs, the report."})
    launcher: str = field(default="python", metadata={"help": "How each stage starts: python, "
                                                              "'deepspeed --num_gpus N' or 'torchrun "
                                                              "--nproc_per_node N'."})
    overwrite: bool = field(default=False, metadata={"help": "Redo stages that finished earlier."})
    sft_dataset: str = "alpaca_gpt4_zh"
    rm_dataset: str = field(default="comparison_gpt4_zh_train", metadata={
        "help": "Comparison pairs the reward model (and DPO) train on: by default the shipped Chinese pairs without "
                "the held-out ones (data/NOTICE.md)."})
    rm_eval_dataset: str = field(default="comparison_gpt4_zh_heldout", metadata={
        "help": "Pairs the reward model (and DPO) are scored on, never trained on: by default half of them are "
                "pairs where the better answer is the shorter one, so the report can say whether the RM judges "
                "more than length (docs/length-bias.md)."})
    sft_examples: int | None = field(default=None, metadata={"help": "Instruction records for SFT (the rest are "
                                                                     "PPO's); default from the model's profile."})
    sft_eval: int | None = field(default=None, metadata={"help": "Of those, held out for perplexity."})
    sft_epochs: float = 1.0
    sft_learning_rate: float = 2e-4
    rm_pairs: int | None = field(default=None, metadata={"help": "Comparison records the reward model trains on."})
    rm_eval: int | None = field(default=None, metadata={"help": "Pairs of --rm_eval_dataset it is scored on (the "
                                                                "first ones)."})
    rm_learning_rate: float = 2e-4
    ppo_steps: int | None = None
    ppo_eval_prompts: int | None = None
    ppo_learning_rate: float = 2e-4
    ppo_epochs: int | None = None
    rm_length_debias: str = field(default="length_negatives+regress", metadata={
        "help": "The reward model's --length_debias (none for the plain RM)."})
    dpo_pairs: int | None = field(default=None, metadata={"help": "Comparison records DPO trains on (the first "
                                                                  "ones)."})
    dpo_eval: int | None = field(default=None, metadata={"help": "Pairs of --rm_eval_dataset its implicit reward "
                                                                 "is scored on."})
    dpo_epochs: float | None = None
    dpo_learning_rate: float = 1e-4
    dpo_beta: float = 0.1
    judge_prompts: int | None = field(default=None, metadata={"help": "Held-out prompts both policies answer."})
    grpo_dataset: str = "arithmetic_train"
    grpo_eval_dataset: str = "arithmetic_test"
    grpo_steps: int | None = None
    grpo_prompts: int | None = field(default=None, metadata={"help": "Prompts per GRPO step."})
    grpo_samples: int | None = field(default=None, metadata={"help": "Answers per prompt."})
    grpo_max_new_tokens: int | None = None
    grpo_overlong_buffer: int | None = field(default=None, metadata={
        "help": "DAPO's overlong penalty on GRPO's answers: free up to --grpo_max_new_tokens minus this, then down to "
                "-1 at the cap (0: off). Default: the profile's, scaled to a --grpo_max_new_tokens given."})
    grpo_learning_rate: float = 2e-4
    grpo_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of GRPO's answers (at 1.0 "
                                                                   "the default model solves a third as many)."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where the hardware runs it fast, else "
                                                             "fp32: every stage gets --bf16), or bf16, fp16, fp32 "
                                                             "exactly (--precision)."})
    max_length: int | None = field(default=None, metadata={"help": "SFT and RM sequence length."})
    max_prompt_length: int = 128
    max_new_tokens: int = 48
    seed: int = 42
    sft_args: str = field(default="", metadata={"help": "Extra flags for train_sft.py (quoted)."})
    rm_args: str = field(default="", metadata={"help": "Extra flags for train_rm.py (quoted)."})
    ppo_args: str = field(default="", metadata={"help": "Extra flags for train_ppo.py (quoted)."})
    dpo_args: str = field(default="", metadata={"help": "Extra flags for train_dpo.py (quoted)."})
    grpo_args: str = field(default="", metadata={"help": "Extra flags for train_grpo.py (quoted)."})

    def __post_init__(self) -> None:
        if self.algo not in PATHS:
            raise UserError(f"--algo {self.algo!r}: choose one of {', '.join(PATHS)}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"--precision {self.precision!r}: choose auto, bf16, fp16 or fp32")
        profiles = PROFILES.get(self.model, DEFAULT_PROFILE)
        self.profile = self.expected_precision()
        profile = profiles[self.profile]
        if self.grpo_overlong_buffer is None and self.grpo_max_new_tokens is not None:  # the same share of the cap
            self.grpo_overlong_buffer = round(profile["grpo_overlong_buffer"] * self.grpo_max_new_tokens
                                              / profile["grpo_max_new_tokens"])
        for name, value in profile.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not 0 <= self.grpo_overlong_buffer < self.grpo_max_new_tokens:
            raise UserError(f"--grpo_overlong_buffer {self.grpo_overlong_buffer} must be in [0, --grpo_max_new_tokens "
                            f"{self.grpo_max_new_tokens})")

    def expected_precision(self) -> str:
        """The profile to size the stages by: the precision they will run in on this machine ('bf16' or 'fp32')."""
        if self.precision != "auto":
            return "bf16" if self.precision in ("bf16", "fp16") else "fp32"
        from rlhf_ds.engines.precision import resolve_precision

        return "bf16" if resolve_precision(bf16=True).name in ("bf16", "fp16") else "fp32"


def split_instruction_data(args: RecipeArguments, out: Path) -> tuple[Path, Path]:
    """The instruction file's records, shuffled once, into sft.json and ppo_prompts.json (disjoint)."""
    sft_file, ppo_file = out / "data" / "sft.json", out / "data" / "ppo_prompts.json"
    if sft_file.is_file() and ppo_file.is_file():
        return sft_file, ppo_file
    source = resolve(args.sft_dataset, DEFAULT_DATASET_DIR)
    text = source.path.read_text(encoding="utf-8")
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
    need = args.sft_examples + args.ppo_eval_prompts + 8
    if len(records) < need:
        raise UserError(f"{source.path} has {len(records)} records; the recipe needs at least {need} "
                        f"(--sft_examples {args.sft_examples} + PPO prompts)")
    random.Random(args.seed).shuffle(records)
    sft_file.parent.mkdir(parents=True, exist_ok=True)
    sft_file.write_text(json.dumps(records[: args.sft_examples], ensure_ascii=False), encoding="utf-8")
    ppo_file.write_text(json.dumps(records[args.sft_examples:], ensure_ascii=False), encoding="utf-8")
    return sft_file, ppo_file


def stage_commands(args: RecipeArguments, out: Path, sft_file: Path, ppo_file: Path) -> dict[str, list[str]]:
    """Each stage's flags for the chosen path, in order (the first item names the stage's script)."""
    precision = ["--bf16"] if args.precision == "auto" else ["--precision", args.precision]
    common = ["--model_name_or_path", args.model, "--do_train", "--finetuning_type", "lora", *precision,
              "--lr_scheduler_type", "cosine", "--seed", str(args.seed), "--save_steps", "0", "--logging_steps", "2",
              "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    commands = {
        "sft": [*common, "--plot_loss", "--dataset", str(sft_file), "--output_dir", str(out / "sft"),
                "--do_eval", "--eval_before_train", "--val_size", str(args.sft_eval),
                "--num_train_epochs", str(args.sft_epochs), "--learning_rate", str(args.sft_learning_rate),
                "--max_length", str(args.max_length), "--warmup_ratio", "0.05", *shlex.split(args.sft_args)],
        "rm": [*common, "--plot_loss", "--dataset", args.rm_dataset, "--max_samples", str(args.rm_pairs),
               "--output_dir", str(out / "rm"), "--do_eval", "--eval_dataset", args.rm_eval_dataset,
               "--max_eval_samples", str(args.rm_eval),
               "--num_train_epochs", "1", "--learning_rate", str(args.rm_learning_rate),
               "--max_length", str(args.max_length), "--warmup_ratio", "0.05",
               "--length_debias", args.rm_length_debias, *shlex.split(args.rm_args)],
        "ppo": [*common, "--dataset", str(ppo_file), "--sft_model", str(out / "sft"),
                "--reward_model", str(out / "rm"), "--output_dir", str(out / "ppo"), "--do_eval",
                "--val_size", str(args.ppo_eval_prompts), "--eval_steps", str(args.ppo_steps),
                "--max_steps", str(args.ppo_steps), "--learning_rate", str(args.ppo_learning_rate),
                "--ppo_epochs", str(args.ppo_epochs), "--max_prompt_length", str(args.max_prompt_length),
                "--max_new_tokens", str(args.max_new_tokens), "--num_samples_to_log", "4",
                *shlex.split(args.ppo_args)],
        "dpo": [*common, "--plot_loss", "--dataset", args.rm_dataset, "--max_samples", str(args.dpo_pairs),
                "--sft_model", str(out / "sft"), "--output_dir", str(out / "dpo"), "--do_eval",
                "--eval_dataset", args.rm_eval_dataset, "--max_eval_samples", str(args.dpo_eval),
                "--num_train_epochs", str(args.dpo_epochs),
                "--learning_rate", str(args.dpo_learning_rate), "--beta", str(args.dpo_beta),
                "--max_length", str(args.max_length), "--warmup_ratio", "0.05", *shlex.split(args.dpo_args)],
        "judge": ["--policy", f"sft={out / 'sft'}", "--policy", f"dpo={out / 'dpo'}", "--reward_model",
                  str(out / "rm"), "--dataset", str(ppo_file), "--max_samples", str(args.judge_prompts),
                  "--max_new_tokens", str(args.max_new_tokens), "--output_file", str(out / "judge" / "judge.json"),
                  *(["--bf16"] if args.precision == "auto" else [])],
        "grpo": ["--model_name_or_path", args.model, "--do_train", "--finetuning_type", "lora", *precision,
                 "--seed", str(args.seed), "--save_steps", "0", "--logging_steps", "2", "--dataset", args.grpo_dataset,
                 "--reward_fn", "math", "--n_samples_per_prompt", str(args.grpo_samples),
                 "--per_device_train_batch_size", str(args.grpo_prompts), "--max_steps", str(args.grpo_steps),
                 "--learning_rate", str(args.grpo_learning_rate), "--lr_scheduler_type", "constant",
                 "--max_new_tokens", str(args.grpo_max_new_tokens), "--max_prompt_length", str(args.max_prompt_length),
                 "--temperature", str(args.grpo_temperature), "--output_dir", str(out / "grpo"), "--do_eval", "--eval_dataset",
                 args.grpo_eval_dataset, "--eval_steps", str(args.grpo_steps),
                 "--per_device_eval_batch_size", "16", "--num_samples_to_log", "4",
                 *(["--overlong_buffer", str(args.grpo_overlong_buffer)] if args.grpo_overlong_buffer else []),
                 *shlex.split(args.grpo_args)],
    }
    return {name: [SCRIPTS[name], *commands[name]] for name in PATHS[args.algo]}


def run_stage(name: str, command: list[str], args: RecipeArguments, out: Path) -> tuple[float, float]:
    """Run one stage through the launcher, streaming its output to the console and to OUTPUT/logs/NAME.log.
    Returns its wall seconds and its peak memory in GiB (the largest resident set of any one of its processes)."""
    script, flags = command[0], command[1:]
    launcher = shlex.split(args.launcher)
    if launcher[0] == "python":
        launcher[0] = sys.executable
    if not script:  # a single-process tool (the judge), not a distributed stage
        cmd = [sys.executable, "-m", "rlhf_ds.cli", COMMAND_OF[name], *flags]
        (out / name).mkdir(parents=True, exist_ok=True)
    elif (REPO_ROOT / "launch" / script).is_file():  # a source checkout: the scripts a user would run by hand
        cmd = [*launcher, str(REPO_ROOT / "launch" / script), *flags]
    else:  # an installed package: the same command as a module
        module = {"deepspeed": ["--module"], "torchrun": ["-m"]}.get(Path(launcher[0]).name, ["-m"])
        cmd = [*launcher, *module, "rlhf_ds.cli", COMMAND_OF[name], *flags]
    if args.overwrite and script:
        cmd.append("--overwrite_output_dir")
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    stages = PATHS[args.algo]
    title = f"{stages.index(name) + 1}/{len(stages)} {WHAT[name]}"
    print(f"\n=== {title}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            sink.write(line)
        # wait4 rather than wait: the child's resource usage comes with it (ru_maxrss covers the launcher's ranks)
        _, status, usage = os.wait4(proc.pid, 0)
        rc = proc.returncode = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise UserError(f"the {name} stage failed (exit {rc}); its output is in {log}")
    return time.time() - t0, usage.ru_maxrss / 2 ** 20


def run_recipe(args: RecipeArguments) -> Path:
    from rlhf_ds.report import build_report

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sft_file, ppo_file = split_instruction_data(args, out) if args.algo != "grpo" else (None, None)
    commands = stage_commands(args, out, sft_file, ppo_file)
    state_file = out / "recipe.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() and not args.overwrite else {}
    minutes = state.get("minutes", {})
    peaks = state.get("peak_memory_gib", {})
    where = where_measured()
    t0 = time.time()
    for name, command in commands.items():
        if (out / name / FINISHED[name]).is_file() and not args.overwrite:
            print(f"\n=== {WHAT[name]}: finished earlier in {out / name}, kept (--overwrite redoes it)", flush=True)
            continue
        seconds, peak = run_stage(name, command, args, out)
        minutes[name] = round(seconds / 60, 2)
        peaks[name] = round(peak, 2)
        state.update(algo=args.algo, model=args.model, launcher=args.launcher, profile=args.profile, minutes=minutes,
                     peak_memory_gib=peaks, arguments=asdict(args), **where)
        state_file.write_text(json.dumps(state, indent=2))
    state["wall_minutes"] = round(sum(minutes.values()), 2)
    state_file.write_text(json.dumps(state, indent=2))
    report = build_report(out, state)
    _print_summary(out, report, state, time.time() - t0)
    return report


def where_measured() -> dict[str, str]:
    """The commit (when rlhf_ds runs from a git checkout) and the processor, so the minutes in recipe.json are
    never read without the machine and the code that made them."""
    where = {}
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode == 0:
            where["commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        if names:
            where["cpu"] = f"{names[0]} ({len(names)} cores)"
    except OSError:
        pass
    return where


def _print_summary(out: Path, report: Path, state: dict, seconds: float) -> None:
    """The headline figures of the path that ran, one line each (the report has the rest)."""
    from rlhf_ds.report import _json, _jsonl

    print(f"\n=== done in {seconds / 60:.1f} min ({state['wall_minutes']} min of stages): {report}")
    algo = state.get("algo", "ppo")
    if "sft" in PATHS[algo]:
        sft = _json(out / "sft" / "eval_results.json")
        print(f"  SFT  held-out perplexity   {sft.get('init_eval_perplexity', float('nan')):.2f} -> "
              f"{sft['eval_perplexity']:.2f}")
    for name in ("rm", "dpo"):
        if name in PATHS[algo]:
            ev = _json(out / name / "eval_results.json")
            shorter = ev.get("eval_accuracy_chosen_shorter")
            shorter = (f"{shorter:.3f} on {ev.get('eval_chosen_shorter_pairs')} pairs" if shorter is not None
                       and math.isfinite(shorter) else "no such pair held out")
            print(f"  {name.upper():4} held-out accuracy     {ev['eval_accuracy']:.3f}   (length-only baseline "
                  f"{ev['eval_length_baseline_accuracy']:.3f}; where the better answer is shorter: {shorter})")
    for name in ("ppo", "grpo"):
        if name not in PATHS[algo]:
            continue
        evals = _jsonl(out / name / "eval_results.jsonl")
        first, last = evals[0], evals[-1]
        label = name.upper()
        if "eval_accuracy" in last:
            print(f"  {label:4} held-out accuracy     {first['eval_accuracy']:.3f} -> {last['eval_accuracy']:.3f}   "
                  f"({last['eval_samples']} problems)")
        print(f"  {label:4} held-out reward       {first['eval_reward']:.3f} -> {last['eval_reward']:.3f}")
        if name == "ppo":
            print(f"  PPO  win rate vs reference {first['eval_win_rate']:.3f} -> {last['eval_win_rate']:.3f}   "
                  f"KL {first['eval_kl']:.2f} -> {last['eval_kl']:.2f}")
        print(f"  {label:4} answer length         {first['eval_response_length']:.1f} -> "
              f"{last['eval_response_length']:.1f} tokens")
    if "judge" in PATHS[algo]:
        judged = _json(out / "judge" / "judge.json")["policies"]
        base, *others = judged
        for name in others:
            print(f"  {name} vs {base}: win rate {judged[name]['win_rate_vs_first']:.3f} (judged by the RM), "
                  f"answer length {judged[name]['length_change_vs_first']:+.0%}")
    final = {"ppo": "ppo", "dpo": "dpo", "grpo": "grpo"}[algo]
    print(f"  chat with the result:  python launch/chat.py --model {out / final}")


def main(argv: list[str] | None = None) -> int:
    from rlhf_ds.flag_parsing import parse_args

    (args,) = parse_args(RecipeArguments, argv=argv)
    run_recipe(args)
    return 0
