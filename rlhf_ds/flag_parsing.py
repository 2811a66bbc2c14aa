"""From a command line (or a flags file) to the dataclasses of rlhf_ds/args.py: parsing, the range and choice
checks the dataclasses run on themselves, the flags a stage refuses, and the flat record saved beside a model."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from rlhf_ds.errors import UserError


def check_range(flag: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """One line for a number out of its range (NaN and infinities are never in one)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{flag} {value}: must be a finite number")
        bounds = ("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", " + \
            ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None else "]")
        raise UserError(f"--{flag} {value}: must be in {bounds}")


def check_finite(obj: Any) -> None:
    """Every float flag of a group is a finite number (argparse accepts 'nan' and 'inf')."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name} {value}: must be a finite number")


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"--{flag} {value!r}: choose one of {', '.join(choices)}")


def config_file_to_argv(path: str) -> list[str]:
    """Turn a YAML/JSON file of flag values into `--flag value` pairs."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise UserError(f"config file {path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") \
            from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise UserError(f"config file {path}: invalid YAML at {where}{getattr(err, 'problem', None) or err}") \
            from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values")
    argv: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


# Flags that the shared groups give a stage which it has no use for: refused with a hint, never silently ignored.
UNUSED_FLAGS: dict[str, dict[str, str]] = {
    "sft": {"keep_ties": "SFT data has no pairs", "max_answers_per_record": "SFT data has no pairs"},
    "online": {
        "keep_ties": "prompts have no pairs",
        "max_answers_per_record": "prompts have no pairs",
        "gradient_checkpointing": "use --actor_gradient_checkpointing and --critic_gradient_checkpointing",
        "max_length": "the online trainers use --max_prompt_length and --max_new_tokens",
        "group_by_length": "prompts are not grouped by length in the online trainers",
        "plot_loss": "the online trainers' curves are in metrics.jsonl (python -m rlhf_ds.report plots a recipe)",
    },
    "eval_rm.py": {
        "deepspeed": "eval_rm.py builds an inference engine from --zero_stage and --offload",
        "val_size": "eval_rm.py scores every pair of --dataset",
        "eval_dataset": "give the file to score as --dataset",
        "max_eval_samples": "eval_rm.py scores --max_samples records of --dataset",
    },
}
def given_flags(argv: list[str]) -> set[str]:
    """The flag names written on a command line (--name, --name=value, and --no_name for a boolean)."""
    names = set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            names.add(name)
            if name.startswith("no_"):
                names.add(name[3:])
    return names


def parse_args(*groups: type, argv: list[str] | None = None, unused: str | None = None,
               defaults: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """Parse argv (default sys.argv[1:]) into one instance of each dataclass in `groups`. `unused` names an entry of
    UNUSED_FLAGS (flags refused for this stage); `defaults` are this stage's own defaults."""
    from transformers import HfArgumentParser

    argv = _drop_local_rank(list(sys.argv[1:] if argv is None else argv))
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = config_file_to_argv(argv[0]) + argv[1:]
    for flag, hint in UNUSED_FLAGS.get(unused or "", {}).items():
        if flag in given_flags(argv):
            raise UserError(f"--{flag} is not used here: {hint}; remove it")
    parser = HfArgumentParser(groups, allow_abbrev=False)
    if defaults:
        parser.set_defaults(**defaults)
    # argparse's own errors (wrong type, missing value) exit with status 2 and a usage line: clear enough.
    parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    *values, remaining = parsed
    if remaining:
        raise UserError(f"unknown argument(s): {' '.join(remaining)} (see --help)")
    given = given_flags(argv)
    for value in values:
        check_finite(value)  # which flags the user wrote, for checks that depend on other flags
        value.given = {f.name for f in fields(value)} & given
    return tuple(values)


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; the same number is in $LOCAL_RANK, which we use."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank" or arg == "--local-rank":
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


def to_dict(*objs: Any) -> dict[str, Any]:
    """All flag values of the given dataclass instances, for saving beside a model."""
    out: dict[str, Any] = {}
    for obj in objs:
        out.update({f.name: getattr(obj, f.name) for f in fields(obj)})
    return out
