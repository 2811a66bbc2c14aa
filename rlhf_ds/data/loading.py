"""Read datasets through 🤗 datasets, check and normalise every record, split, and tokenise.

Caching: `datasets` caches each `map` under a fingerprint. The first map's fingerprint is derived from the file's
sha1 (not its path or timestamp), so the same content is prepared once wherever it lies; later maps chain from
it through the function's hash (tokenizer and settings included).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import datasets

from rlhf_ds import dist
from rlhf_ds.data.formats import KINDS, check_record, detect_format, normaliser
from rlhf_ds.data.registry import DatasetSource, file_sha1, resolve
from rlhf_ds.data.template import render_prompt
from rlhf_ds.errors import UserError

logger = logging.getLogger(__name__)

NORMALISE_VERSION = "1"  # bump when formats.py changes what it produces


@dataclass
class DataReport:
    """What happened to the data, printed before training so nothing is dropped silently."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)
        if dist.is_main():
            logger.info(line)


PROGRESS_MIN_ROWS = 20_000  # below this, preparing data takes a second or two: one summary line is enough


def _configure_progress(rows: int = 0) -> None:
    if dist.is_main() and rows >= PROGRESS_MIN_ROWS:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()


def _load_raw(source: DatasetSource, kind: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset("json", data_files=str(source.path), split="train")
    except Exception as err:  # noqa: BLE001 - any failure is re-diagnosed below for a precise message
        raise diagnose_json(source, kind) from err


def diagnose_json(source: DatasetSource, kind: str) -> UserError:
    """Find out precisely why a file failed to load: bad JSON (line, column) or the first bad record."""
    path = source.path
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return UserError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8")
    except OSError as err:
        return UserError(f"{path}: cannot read: {err.strerror}")
    records: list[Any]
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                return UserError(f"{path}: line {lineno}: invalid JSON ({err.msg}, column {err.colno}); "
                                 f"each line of a .jsonl file must be one JSON object")
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            return UserError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}")
        if not isinstance(records, list):
            return UserError(f"{path}: expected a JSON list of records (or JSON Lines), got {type(records).__name__}")
    if not records:
        return UserError(f"{path}: the file holds no records")
    fmt = source.format
    if fmt is None:
        fmt = detect_format(records[0] if isinstance(records[0], dict) else {}, str(path))
    for index, record in enumerate(records):
        try:
            check_record(fmt, kind, record, str(path), index)
        except UserError as err:
            return err
    return UserError(f"{path}: could not be loaded although every record looks valid; "
                     f"check that each key has the same type in every record")


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_examples(spec: str, kind: str, dataset_dir: str, dataset_format: str | None = None,
                  max_samples: int | None = None, keep_ties: bool = False,
                  report: DataReport | None = None, max_answers_per_record: int = 10) -> datasets.Dataset:
    """Load the comma-separated datasets in `spec` as normalised `kind` examples ('preference' or 'sft')."""
    if kind not in KINDS:
        raise ValueError(kind)
    _configure_progress()  # loading itself: quiet
    report = report or DataReport()
    parts: list[datasets.Dataset] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        source = resolve(item, dataset_dir, dataset_format)
        raw = _load_raw(source, kind)
        if len(raw) == 0:
            raise UserError(f"{source.path}: the file holds no records")
        fmt = source.format or detect_format(raw[0], str(source.path))
        n_records = len(raw)
        _configure_progress(n_records)
        if max_samples is not None and max_samples < n_records:
            raw = raw.select(range(max_samples))
        fp = _fingerprint(file_sha1(source.path), fmt, kind, len(raw), NORMALISE_VERSION, max_answers_per_record)
        capped = 0
        if kind == "preference" and fmt == "ranked" and "output" in raw.column_names:
            # (a record without 'output' is reported by the normaliser below, with its line)
            capped = sum(len(o) > max_answers_per_record for o in raw["output"] if isinstance(o, list))
        examples = raw.map(normaliser(fmt, kind, str(source.path), max_answers_per_record), batched=True,
                           with_indices=True,
                           remove_columns=raw.column_names, new_fingerprint=fp,
                           desc=f"checking {item}")
        used = f"{len(raw)} of {n_records}" if len(raw) < n_records else f"{n_records}"
        line = f"{item}: {used} records ({fmt}) from {source.path}"
        if kind == "preference":
            line += f" -> {len(examples)} pairs"
            if capped:
                line += (f"; {capped} record(s) rank more than {max_answers_per_record} answers: only the pairs among "
                         f"their best {max_answers_per_record} were kept (--max_answers_per_record)")
            ties = examples.filter(lambda ex: ex["chosen"] == ex["rejected"], desc="counting ties")
            if len(ties):
                if keep_ties:
                    line += f"; kept {len(ties)} ties (chosen == rejected)"
                else:
                    examples = examples.filter(lambda ex: ex["chosen"] != ex["rejected"], desc="dropping ties")
                    line += f"; dropped {len(ties)} ties (chosen == rejected; --keep_ties keeps them)"
                    if len(examples) == 0:
                        raise UserError(f"{source.path}: every one of its {len(ties)} pairs is a tie (the chosen and "
                                        f"the rejected answer are the same text), so there is nothing to learn "
                                        f"from; fix the file, or pass --keep_ties to use them anyway")
        if source.note:
            line += f" [{source.note}]"
        report.add(line)
        parts.append(examples)
    if not parts:
        raise UserError("--dataset is empty; give a registered name or a file")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def split_eval(examples: datasets.Dataset, val_size: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out `val_size` (fraction < 1, or a count) of the examples, the same way on every rank."""
    n = len(examples)
    count = int(val_size) if val_size >= 1 else int(round(n * val_size))
    if count < 1 or count >= n:
        raise UserError(f"--val_size {val_size} leaves {n - count} training and {count} evaluation examples "
                        f"out of {n}; choose a size that leaves both non-empty")
    split = examples.train_test_split(test_size=count, seed=seed, shuffle=True)
    return split["train"], split["test"]


# ---------------------------------------------------------------------------------------------------- tokenising


def fit_to_length(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int], bool, bool]:
    """Cut prompt+response to max_length: the prompt loses tokens from the left; the prompt keeps at least half
    the budget (or all of itself if shorter), and only then is the response cut at its end."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False, False
    prompt_budget = max(max_length - len(response), min(len(prompt), max_length // 2))
    new_prompt = prompt[len(prompt) - prompt_budget:] if prompt_budget > 0 else []
    new_response = response[: max_length - len(new_prompt)]
    return new_prompt, new_response, len(new_prompt) < len(prompt), len(new_response) < len(response)


def _encode_prompts(tokenizer, prompts: list[list[dict]], template: str) -> list[list[int]]:
    texts = [render_prompt(tokenizer, messages, template) for messages in prompts]
    return tokenizer(texts, add_special_tokens=(template == "plain"))["input_ids"]


def _encode_responses(tokenizer, responses: list[str]) -> list[list[int]]:
    ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return [seq + [tokenizer.eos_token_id] for seq in ids]


def tokenize_preference(examples: datasets.Dataset, tokenizer, template: str, max_length: int,
                        report: DataReport | None = None, name: str = "train") -> datasets.Dataset:
    """Add chosen_ids / rejected_ids (prompt + answer + EOS), where each answer starts (chosen_prompt_len,
    rejected_prompt_len: for losses on the answer tokens only), their longer length, and the truncation flags."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        prompts = _encode_prompts(tokenizer, batch["prompt"], template)
        out: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "chosen_prompt_len": [],
                                "rejected_prompt_len": [], "prompt_cut": [], "answer_cut": [], "length": []}
        for side in ("chosen", "rejected"):
            answers = _encode_responses(tokenizer, batch[side])
            for i, (p, r) in enumerate(zip(prompts, answers)):
                p2, r2, p_cut, r_cut = fit_to_length(p, r, max_length)
                out[f"{side}_ids"].append(p2 + r2)
                out[f"{side}_prompt_len"].append(len(p2))
                if side == "chosen":
                    out["prompt_cut"].append(p_cut)
                    out["answer_cut"].append(r_cut)
                else:
                    out["prompt_cut"][i] = out["prompt_cut"][i] or p_cut
                    out["answer_cut"][i] = out["answer_cut"][i] or r_cut
        out["length"] = [max(len(c), len(r)) for c, r in zip(out["chosen_ids"], out["rejected_ids"])]
        return out

    _configure_progress(len(examples))
    tokenized = examples.map(encode, batched=True, desc=f"tokenising {name}")
    _report_truncation(tokenized, max_length, report, name)
    same = tokenized.filter(lambda ex: ex["chosen_ids"] == ex["rejected_ids"], desc="finding identical pairs")
    if len(same):
        tokenized = tokenized.filter(lambda ex: ex["chosen_ids"] != ex["rejected_ids"], desc="dropping them")
        if report is not None:
            report.add(f"{name}: {len(same)} pair(s) became identical once cut to --max_length {max_length} (their "
                       f"answers differ only after the cut): dropped")
        if len(tokenized) == 0:
            raise UserError(f"{name}: every pair is identical once cut to --max_length {max_length}; raise "
                            f"--max_length")
    return tokenized


def tokenize_sft(examples: datasets.Dataset, tokenizer, template: str, max_length: int,
                 report: DataReport | None = None, name: str = "train") -> datasets.Dataset:
    """Add input_ids (prompt + response + EOS), prompt_len (for the response-only loss mask), length, flags."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        prompts = _encode_prompts(tokenizer, batch["prompt"], template)
        answers = _encode_responses(tokenizer, batch["response"])
        out: dict[str, list] = {"input_ids": [], "prompt_len": [], "prompt_cut": [], "answer_cut": [], "length": []}
        for p, r in zip(prompts, answers):
            p2, r2, p_cut, r_cut = fit_to_length(p, r, max_length)
            out["input_ids"].append(p2 + r2)
            out["length"].append(len(p2) + len(r2))
            out["prompt_len"].append(len(p2))
            out["prompt_cut"].append(p_cut)
            out["answer_cut"].append(r_cut)
        return out

    _configure_progress(len(examples))
    tokenized = examples.map(encode, batched=True, desc=f"tokenising {name}")
    _report_truncation(tokenized, max_length, report, name)
    return tokenized


def tokenize_prompts(examples: datasets.Dataset, tokenizer, template: str, max_prompt_length: int,
                     max_length: int, report: DataReport | None = None, name: str = "prompts") -> datasets.Dataset:
    """For the online trainers: prompt_ids (cut from the left to max_prompt_length) to generate from, prompt_text
    (the last user message, for reward functions and samples), the reference answer as reference_text (for reward
    functions that check against it) and as input_ids / prompt_len (for PPO-ptx and the win rate against it)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        prompts = _encode_prompts(tokenizer, batch["prompt"], template)
        answers = _encode_responses(tokenizer, batch["response"])
        out: dict[str, list] = {"prompt_ids": [], "prompt_text": [], "reference_text": batch["response"],
                                "input_ids": [], "prompt_len": [], "prompt_cut": [], "answer_cut": []}
        for messages, p, r in zip(batch["prompt"], prompts, answers):
            out["prompt_ids"].append(p[-max_prompt_length:])
            out["prompt_text"].append(messages[-1]["content"])
            p2, r2, p_cut, r_cut = fit_to_length(p, r, max_length)
            out["input_ids"].append(p2 + r2)
            out["prompt_len"].append(len(p2))
            out["prompt_cut"].append(len(p) > max_prompt_length)
            out["answer_cut"].append(r_cut)
        return out

    _configure_progress(len(examples))
    tokenized = examples.map(encode, batched=True, desc=f"tokenising {name}")
    prompt_cut = sum(tokenized["prompt_cut"])
    if report is not None and prompt_cut:
        report.add(f"{name}: {prompt_cut} of {len(tokenized)} prompts are longer than --max_prompt_length "
                   f"{max_prompt_length} and were cut from the left")
    return tokenized


def _report_truncation(tokenized: datasets.Dataset, max_length: int, report: DataReport | None, name: str) -> None:
    prompt_cut = sum(tokenized["prompt_cut"])
    answer_cut = sum(tokenized["answer_cut"])
    if report is not None and (prompt_cut or answer_cut):
        report.add(f"{name}: {prompt_cut + answer_cut} of {len(tokenized)} examples are longer than --max_length "
                   f"{max_length}: {prompt_cut} had their prompt cut from the left, {answer_cut} an answer cut at "
                   f"the end")
