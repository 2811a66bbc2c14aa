"""Masked statistics and log-probabilities: the pieces every estimator and loss in algo/ is written with.

Shapes: B rows, T response positions. `mask` is 1 on response tokens up to and including the first EOS and 0
after it (and on pads). Nothing in algo/ knows about DeepSpeed, models or ranks; where a statistic spans all ranks,
the cross-rank sum is passed in as a function (`all_reduce_sum`), so the math stays testable on one process.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def register(table: dict, name: str, **attributes):
    """A decorator adding a function to a registry under `name` (selected from the command line); keyword
    attributes (e.g. needs_critic=True) are set on the function."""

    def wrap(fn):
        for key, value in attributes.items():
            setattr(fn, key, value)
        table[name] = fn
        return fn

    return wrap


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is 1; 0 where there are none (never NaN)."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1) if dim is not None else \
        masked_sum(x, mask) / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked positions (or with given (mean, var)); masked-out positions come back as 0.
    shift_mean=False keeps the mean (rewards), True removes it (advantages)."""
    mean, var = stats if stats is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def global_moments(x: torch.Tensor, mask: torch.Tensor, all_reduce_sum: AllReduce | None = None) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the masked entries of x over every rank (all_reduce_sum sums a tensor over
    ranks; None: this process alone)."""
    totals = torch.stack([mask.sum(), (x * mask).sum(), (x ** 2 * mask).sum()]).double().cpu()
    if all_reduce_sum is not None:
        totals = all_reduce_sum(totals)
    count, total, total_sq = totals.tolist()
    mean = total / max(count, 1)
    var = max(total_sq / max(count, 1) - mean ** 2, 0.0) * count / max(count - 1, 1)
    return torch.tensor(mean), torch.tensor(var)


def whiten_over_ranks(x: torch.Tensor, mask: torch.Tensor, all_reduce_sum: AllReduce | None = None,
                      shift_mean: bool = True) -> torch.Tensor:
    """masked_whiten with the mean and variance of the whole batch over every rank."""
    return masked_whiten(x, mask, shift_mean, stats=global_moments(x, mask, all_reduce_sum))


# The three functions below take the log-softmax one row (sequence) at a time, as TRL's selective_log_softmax does.
# Over a whole batch it is a second tensor as large as the logits (1.9 GB for 16 rows of 190 tokens over Qwen2.5's
# 151,936-token vocabulary); on the non-contiguous slice logits[:, :-1] that the trainers pass, torch's CPU kernel
# took 9.7 s for those 16 rows on its first call and 1.6 s at best, against 0.9 s row by row, with identical values
# (benchmarks/logprobs_rows.py, 2-core AMD EPYC). A row of such a slice is contiguous, and its log-softmax is small.

def _row_log_softmaxes(logits: torch.Tensor, temperature: float) -> Iterator[torch.Tensor]:
    for row in logits:
        row = row.float()
        if temperature != 1.0:
            row = row / temperature
        yield torch.log_softmax(row, dim=-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def _stacked(rows: list[torch.Tensor], like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The rows as one [B, T] float32 tensor (an empty batch too)."""
    return torch.stack(rows) if rows else like.new_zeros(shape, dtype=torch.float32)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`. logits [B, T, V], tokens [B, T] -> [B, T] (float32).
    Dividing by the sampling temperature makes these the log-probs of the distribution actually sampled from."""
    return _stacked([logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
                     for logp, t in zip(_row_log_softmaxes(logits, temperature), tokens)], logits, tokens.shape)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> tuple[
        torch.Tensor, torch.Tensor]:
    """logprobs_from_logits (with its gradient) and, from the same log-softmax, entropy_from_logits (without one):
    one pass over the vocabulary instead of two."""
    logps, entropies = [], []
    for logp, t in zip(_row_log_softmaxes(logits, temperature), tokens):
        with torch.no_grad():
            entropies.append(_entropy(logp))
        logps.append(logp.gather(-1, t.unsqueeze(-1)).squeeze(-1))
    return _stacked(logps, logits, tokens.shape), _stacked(entropies, logits, tokens.shape)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, [B, T]."""
    return _stacked([_entropy(logp) for logp in _row_log_softmaxes(logits, temperature)], logits, logits.shape[:-1])


def response_mask(response: torch.Tensor, eos_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """1 on response tokens up to and including the first EOS, 0 after it. response [B, N] -> [B, N] long."""
    eos = torch.as_tensor(eos_ids, device=response.device)
    is_eos = torch.isin(response, eos).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).long()


def has_eos(response: torch.Tensor, mask: torch.Tensor, eos_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Whether each response ended with an EOS inside its mask, [B] bool."""
    eos = torch.as_tensor(eos_ids, device=response.device)
    return (torch.isin(response, eos) & mask.bool()).any(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over masked positions: 1 is a perfect critic, 0 predicts nothing."""
    var_returns = masked_var(returns, mask, unbiased=False)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns.clamp(min=1e-8)
