"""A verifiable task a 0.5B model partly solves on a CPU budget: short arithmetic word problems, generated with a
seed, in the `qa` layout of GSM8K (question, worked answer ending in "#### N"). GSM8K itself is too hard for a
0.5B model to improve on measurably within half an hour of CPU time; these problems take one or two operations on
small numbers, and the instruction asks for one line, so a rollout needs few tokens. Measured with
Qwen2.5-Coder-0.5B-Instruct (greedy, 48 test problems): asked to think step by step it is right 77% of the time
but needs about 180 tokens (0% within 64); asked for one line it answers in about 16 tokens and is right 15% of
the time, often skipping the calculation — room for GRPO to teach it to write the calculation down.

`python -m rlhf_ds.data.arithmetic` rebuilds data/arithmetic_{train,test}.jsonl byte for byte (their sha256 are in
data/NOTICE.md); the test problems never appear in the training file.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from rlhf_ds.args import DEFAULT_DATASET_DIR

SEED = 1729
SIZES = {"train": 3000, "test": 240}
INSTRUCTION = "Write the calculation in one short line, then end with 'The answer is N'."

NAMES = ["Ana", "Ben", "Chen", "Dina", "Eli", "Fatima", "Gao", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mei", "Noor"]
THINGS = ["apples", "books", "marbles", "stamps", "coins", "pencils", "stickers", "cards", "shells", "beads"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.randrange(4)
    if kind == 0:  # a + b * c
        a, b, c = rng.randint(5, 60), rng.randint(2, 9), rng.randint(3, 15)
        total = a + b * c
        q = f"{name} has {a} {thing}. {name} buys {b} boxes with {c} {thing} in each. How many {thing} does {name} " \
            f"have now?"
        steps = f"{b} boxes of {c} make {b * c}. {a} + {b * c} = {total}."
    elif kind == 1:  # a * b - c
        a, b = rng.randint(3, 12), rng.randint(4, 20)
        c = rng.randint(1, a * b - 1)
        total = a * b - c
        q = f"{name} packs {a} bags of {b} {thing} and then gives away {c} {thing}. How many {thing} are left?"
        steps = f"{a} bags of {b} make {a * b}. {a * b} - {c} = {total}."
    elif kind == 2:  # (a + b) / c, exact
        c = rng.randint(2, 9)
        total = rng.randint(3, 30)
        a = rng.randint(1, total * c - 1)
        b = total * c - a
        q = f"{name} has {a} {thing} and finds {b} more, then shares them equally among {c} friends. How many " \
            f"{thing} does each friend get?"
        steps = f"{a} + {b} = {a + b}. {a + b} / {c} = {total}."
    else:  # a - b + c
        a = rng.randint(20, 90)
        b, c = rng.randint(1, a - 1), rng.randint(5, 60)
        total = a - b + c
        q = f"{name} had {a} {thing}, lost {b}, and was then given {c}. How many {thing} does {name} have?"
        steps = f"{a} - {b} = {a - b}. {a - b} + {c} = {total}."
    return f"{q} {INSTRUCTION}", f"{steps}\n#### {total}", total


def build() -> dict[str, list[dict]]:
    """{"train": records, "test": records}, with no question in both."""
    rng = random.Random(SEED)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, size in (("test", SIZES["test"]), ("train", SIZES["train"])):
        records = []
        while len(records) < size:
            question, answer, _ = _problem(rng)
            if question in seen:
                continue
            seen.add(question)
            records.append({"question": question, "answer": answer})
        out[split] = records
    return out


def write(data_dir: str | Path = DEFAULT_DATASET_DIR) -> list[Path]:
    paths = []
    for split, records in build().items():
        path = Path(data_dir) / f"arithmetic_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write():
        print(written)
