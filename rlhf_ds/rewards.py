"""Reward functions: rule rewards instead of (or beside) a trained reward model (`--reward_fn`).

`--reward_fn` takes a comma-separated list of built-in names and user functions:

    math                  1 if the answer's final number equals the reference answer's, else 0 (verifiable)
    format                1 if the answer states its final answer in a recognised form, else 0
    module:function       an importable function, or
    path/file.py:function a function in a file,

each taking (prompt, response) or (prompt, response, reference) and returning a number; `reference` is the
record's reference answer (the dataset's "output" or "answer"). Several sources are summed with --reward_weights.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhf_ds.errors import UserError

BUILTIN_REWARDS: dict[str, Callable[..., float]] = {}


def builtin(name: str):
    def wrap(fn):
        BUILTIN_REWARDS[name] = fn
        return fn

    return wrap


# ------------------------------------------------------------------------------------------ verifiable math
_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+"
_FINAL_MARK = re.compile(r"####\s*(" + _NUMBER + ")")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def parse_number(text: str) -> float | None:
    """'1,234.5', '$18', '-3', '72 apples', '50%' -> a float; None if there is no number."""
    found = _ANY_NUMBER.search(text or "")
    if not found:
        return None
    cleaned = found.group(0).replace(",", "").replace("$", "").replace(" ", "")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def final_answer(text: str) -> float | None:
    """The number an answer gives as final: after '####', inside \\boxed{}, after 'the answer is', else the last
    number in the text."""
    for pattern in (_FINAL_MARK, _BOXED, _ANSWER_IS):
        found = pattern.findall(text or "")
        if found:
            value = parse_number(found[-1])
            if value is not None:
                return value
    numbers = _ANY_NUMBER.findall(text or "")
    return parse_number(numbers[-1]) if numbers else None


def same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


@builtin("math")
def math_answer(prompt: str, response: str, reference: str) -> float:
    """1.0 when the answer's final number equals the reference's final number (GSM8K's '#### 72'), else 0.0."""
    return 1.0 if same_number(final_answer(response), final_answer(reference)) else 0.0


@builtin("format")
def answer_format(prompt: str, response: str) -> float:
    """1.0 when the answer marks its final answer ('#### N', '\\boxed{N}' or 'the answer is N'), else 0.0."""
    text = response or ""
    return 1.0 if (_FINAL_MARK.search(text) or _BOXED.search(text) or _ANSWER_IS.search(text)) else 0.0


# ------------------------------------------------------------------------------------------ user functions
@dataclass
class RewardFunction:
    name: str
    fn: Callable[..., float]
    wants_reference: bool

    def __call__(self, prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
        scores = []
        for prompt, response, reference in zip(prompts, responses, references):
            value = self.fn(prompt, response, reference) if self.wants_reference else self.fn(prompt, response)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise UserError(f"--reward_fn {self.name}: returned {value!r} for a response; it must return a "
                                f"number") from None
            if not math.isfinite(number):
                raise UserError(f"--reward_fn {self.name}: returned {number} for a response; it must be finite")
            scores.append(number)
        return scores


def _takes_reference(fn: Callable, spec: str) -> bool:
    signature = inspect.signature(fn)
    for args in (("p", "r", "ref"), ("p", "r")):
        try:
            signature.bind(*args)
            return len(args) == 3
        except TypeError:
            continue
    raise UserError(f"--reward_fn {spec!r}: the function must accept (prompt, response) or (prompt, response, "
                    f"reference)")


def load_reward_fn(spec: str) -> RewardFunction:
    if spec in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[spec]
        return RewardFunction(spec, fn, _takes_reference(fn, spec))
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--reward_fn {spec!r}: a built-in name ({', '.join(BUILTIN_REWARDS)}), module:function or "
                        f"path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"--reward_fn {spec!r}: {path} not found")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - a user's module failing to import
        raise UserError(f"--reward_fn {spec!r}: importing {module_name} failed: {type(err).__name__}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"--reward_fn {spec!r}: {module_name} has no function {attr!r}")
    return RewardFunction(spec, fn, _takes_reference(fn, spec))
