#!/usr/bin/env python
"""The log-probabilities of answer tokens from a batch of logits, taken the way the trainers take them
(logits[:, :-1], a non-contiguous slice) over a Qwen2.5-sized vocabulary: the whole batch's log-softmax at once
against rlhf_ds.algo.core.logprobs_from_logits (one row at a time). Prints one JSON line per batch size with the
seconds of each (its first call, and the best of three), the largest difference between them, the commit, the processor and the threads.

    python benchmarks/logprobs_rows.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf_ds.algo.core import logprobs_from_logits  # noqa: E402
from rlhf_ds.engines.precision import cpu_description  # noqa: E402

VOCAB, LENGTH, REPEATS = 151936, 190, 3


def whole_batch(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def timed(fn, *args) -> tuple[float, float, torch.Tensor]:
    """(the first call's seconds, the best of REPEATS calls, the result)."""
    times, out = [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return times[0], min(times), out


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    for rows in (4, 8, 16):
        generator = torch.Generator().manual_seed(rows)
        logits = torch.randn(rows, LENGTH + 1, VOCAB, generator=generator)
        tokens = torch.randint(0, VOCAB, (rows, LENGTH), generator=generator)
        whole_first, whole_s, whole = timed(whole_batch, logits[:, :-1], tokens)
        rows_first, rows_s, by_row = timed(logprobs_from_logits, logits[:, :-1], tokens)
        print(json.dumps({"rows": rows, "tokens_per_row": LENGTH, "vocab": VOCAB,
                          "whole_batch_first_s": round(whole_first, 3), "row_by_row_first_s": round(rows_first, 3),
                          "whole_batch_best_s": round(whole_s, 3), "row_by_row_best_s": round(rows_s, 3),
                          "max_abs_difference": float((whole - by_row).abs().max()), "commit": commit,
                          "cpu": cpu_description().get("model"), "threads": torch.get_num_threads()}), flush=True)
        del logits


if __name__ == "__main__":
    main()
