"""The record layouts rlhf_ds reads, checked record by record and turned into one normalised form.

Normalised examples (the columns after `normalise`):
  preference: prompt (list of {"role", "content"} messages), chosen (str), rejected (str)
  sft:        prompt (messages), response (str)   -- also the PPO prompt set, response = reference answer

Layouts:
  ranked    {"instruction", "input", "output": [best, worse, ...]}   every ordered pair is a comparison
  pairwise  {"instruction", "input", "chosen", "rejected"}
  dialogue  {"chosen", "rejected"} as "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts
  alpaca    {"instruction", "input", "output": str}
  qa        {"question", "answer"}        a question and its reference answer (GSM8K)
ranked / pairwise / alpaca may also carry "system" (str) and "history" ([[question, answer], ...]).
"""
from __future__ import annotations

import re
from typing import Any, Callable

from rlhf_ds.errors import UserError

KINDS = ("preference", "sft")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


class RecordError(UserError):
    """A bad record: names the file, the record (1-based) and what to do."""

    def __init__(self, source: str, index: int, problem: str, fix: str):
        super().__init__(f"{source}: record {index + 1}: {problem} — {fix}")


def detect_format(first_record: dict[str, Any], source: str) -> str:
    """Pick the layout from the keys and value types of the file's first record."""
    keys = {k for k, v in first_record.items() if v is not None}
    if "question" in keys and "answer" in keys:
        return "qa"
    if "output" in keys:
        return "ranked" if isinstance(first_record["output"], list) else "alpaca"
    if "chosen" in keys and "rejected" in keys:
        return "pairwise" if "instruction" in keys else "dialogue"
    raise UserError(
        f"{source}: cannot tell the layout from the first record's keys {sorted(keys)}; expected \"output\" (ranked "
        f"list or alpaca string), \"chosen\"/\"rejected\" or \"question\"/\"answer\". Pass --dataset_format "
        f"ranked|pairwise|dialogue|alpaca|qa.")


def _text(record: dict, key: str, source: str, index: int, *, allow_empty: bool = False,
          optional: bool = False) -> str:
    value = record.get(key)
    if value is None:
        if optional:
            return ""
        raise RecordError(source, index, f"missing key {key!r}",
                          "add it, or pass --dataset_format if the file has another layout")
    if not isinstance(value, str):
        raise RecordError(source, index, f"key {key!r} must be a string, got {type(value).__name__}",
                          "fix the record")
    if not allow_empty and not value.strip():
        raise RecordError(source, index, f"key {key!r} is empty", "fill it in or remove the record")
    return value


def _instruction_messages(record: dict, source: str, index: int) -> list[dict[str, str]]:
    """system + history + the instruction (with its input after a newline) as chat messages."""
    instruction = _text(record, "instruction", source, index)
    extra = _text(record, "input", source, index, allow_empty=True, optional=True)
    messages: list[dict[str, str]] = []
    system = _text(record, "system", source, index, allow_empty=True, optional=True)
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in history):
        raise RecordError(source, index, "key 'history' must be a list of [question, answer] string pairs",
                          "fix the record or drop the key")
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    content = f"{instruction}\n{extra}" if extra.strip() else instruction
    messages.append({"role": "user", "content": content})
    return messages


def _ranked_outputs(record: dict, source: str, index: int) -> list[str]:
    outputs = record.get("output")
    if outputs is None:
        raise RecordError(source, index, "missing key 'output'", "add the list of answers, best first")
    if not isinstance(outputs, list):
        raise RecordError(source, index, f"key 'output' must be a list of answers, got {type(outputs).__name__}",
                          "a ranked record lists its answers best first; use --dataset_format alpaca for "
                          "single answers")
    if len(outputs) < 2:
        raise RecordError(source, index, f"key 'output' has {len(outputs)} answer(s), a comparison needs at "
                          "least 2", "add a worse answer or remove the record")
    for k, out in enumerate(outputs):
        if not isinstance(out, str):
            raise RecordError(source, index, f"output[{k}] must be a string, got {type(out).__name__}",
                              "fix the record")
        if not out.strip():
            raise RecordError(source, index, f"output[{k}] is empty", "fill it in or remove the record")
    return outputs


def split_dialogue(chosen: str, rejected: str, source: str, index: int) -> tuple[list[dict[str, str]], str, str]:
    """Split two transcripts at the last "Assistant:" of their longest common prefix.

    Usually the two share everything up to the final assistant turn; when they differ earlier, the split falls
    at the last assistant turn they still share, and both answers carry the later turns.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)  # the last marker lying wholly inside the common prefix
    if cut < 0:
        raise RecordError(source, index, "the two transcripts share no \"\\n\\nAssistant:\" turn",
                          "each must be a \"\\n\\nHuman: ... \\n\\nAssistant: ...\" transcript with a common prompt")
    end = cut + len(ASSISTANT)
    prompt_text = chosen[:end]
    pieces = _TURN.split(prompt_text)
    messages: list[dict[str, str]] = []
    if pieces[0].strip():
        messages.append({"role": "system", "content": pieces[0].strip()})
    for role, content in zip(pieces[1::2], pieces[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the empty "Assistant:" that the answers follow
    if not any(m["role"] == "user" for m in messages):
        raise RecordError(source, index, "the shared prompt has no \"Human:\" turn",
                          "start each transcript with \"\\n\\nHuman: ...\"")
    return messages, chosen[end:].strip(), rejected[end:].strip()


def _preference_rows(fmt: str, record: dict, source: str, index: int,
                     max_answers: int | None = None) -> list[tuple[list, str, str]]:
    if fmt == "ranked":
        prompt = _instruction_messages(record, source, index)
        outs = _ranked_outputs(record, source, index)[:max_answers]
        return [(prompt, outs[i], outs[j]) for i in range(len(outs)) for j in range(i + 1, len(outs))]
    if fmt == "pairwise":
        prompt = _instruction_messages(record, source, index)
        return [(prompt, _text(record, "chosen", source, index), _text(record, "rejected", source, index))]
    if fmt == "dialogue":
        chosen = _text(record, "chosen", source, index)
        rejected = _text(record, "rejected", source, index)
        prompt, c, r = split_dialogue(chosen, rejected, source, index)
        if not c or not r:
            raise RecordError(source, index, "an answer is empty after the shared prompt",
                              "each transcript must end with an assistant answer")
        return [(prompt, c, r)]
    raise UserError(f"{source}: the {fmt} layout has one answer per prompt; a preference stage needs ranked or "
                    f"paired answers (ranked, pairwise or dialogue)")


def _sft_row(fmt: str, record: dict, source: str, index: int) -> tuple[list, str]:
    if fmt == "alpaca":
        return _instruction_messages(record, source, index), _text(record, "output", source, index)
    if fmt == "qa":
        return [{"role": "user", "content": _text(record, "question", source, index)}], \
            _text(record, "answer", source, index)
    prompt, best, _ = _preference_rows(fmt, record, source, index)[0]
    return prompt, best


def check_record(fmt: str, kind: str, record: Any, source: str, index: int) -> None:
    """Raise a RecordError if `record` is not a valid `fmt` record for a `kind` stage."""
    if not isinstance(record, dict):
        raise RecordError(source, index, f"expected a JSON object, got {type(record).__name__}", "fix the record")
    if kind == "preference":
        _preference_rows(fmt, record, source, index)
    else:
        _sft_row(fmt, record, source, index)


def normaliser(fmt: str, kind: str, source: str,
               max_answers: int | None = None) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
    """A batched `Dataset.map` function (with_indices=True) from raw `fmt` columns to the `kind` columns."""
    if kind not in KINDS:
        raise ValueError(kind)

    def normalise(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        keys = list(batch)
        out: dict[str, list] = {"prompt": []}
        if kind == "preference":
            out.update(chosen=[], rejected=[])
        else:
            out.update(response=[])
        for row, index in enumerate(indices):
            record = {k: batch[k][row] for k in keys}
            if kind == "preference":
                for prompt, chosen, rejected in _preference_rows(fmt, record, source, index, max_answers):
                    out["prompt"].append(prompt)
                    out["chosen"].append(chosen)
                    out["rejected"].append(rejected)
            else:
                prompt, response = _sft_row(fmt, record, source, index)
                out["prompt"].append(prompt)
                out["response"].append(response)
        return out

    return normalise
