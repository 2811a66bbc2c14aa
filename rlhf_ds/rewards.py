"""`--reward_fn module:function`: a Python function as the reward instead of a trained reward model.

The function takes the prompt (the last user message, as text) and the response text and returns a float:

    def reward(prompt: str, response: str) -> float: ...

`module` is an importable module name (`my_pkg.rewards:length_penalty`) or a path to a .py file
(`rewards/my_reward.py:score`).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Callable

from rlhf_ds.errors import UserError

RewardFn = Callable[[str, str], float]


def load_reward_fn(spec: str) -> RewardFn:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--reward_fn {spec!r}: write it as module:function or path/to/file.py:function")
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
    try:
        inspect.signature(fn).bind("prompt", "response")
    except TypeError:
        raise UserError(f"--reward_fn {spec!r}: {attr} must accept (prompt, response)") from None
    return fn


def call_reward_fn(fn: RewardFn, spec: str, prompts: list[str], responses: list[str]) -> list[float]:
    scores = []
    for prompt, response in zip(prompts, responses):
        value = fn(prompt, response)
        try:
            scores.append(float(value))
        except (TypeError, ValueError):
            raise UserError(f"--reward_fn {spec}: returned {value!r} for a response; it must return a number") \
                from None
    return scores
