"""From sequence scores to the per-token rewards the advantage estimators read: normalisation with running
statistics, penalties for answers that never end or run long, and placing the score on the last response token.

Position t of a per-token reward refers to response token t. A sequence's score is received on its last real
token (the EOS, or the last token of an answer cut at --max_new_tokens); nothing is received after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf_ds.algo.core import AllReduce


@dataclass
class RunningMoments:
    """Mean and variance of a stream of scalars (Chan et al.'s parallel merge), optionally started from a prior
    (the reward model's stored score statistics, counted as `count` observations)."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 0.0

    def update(self, xs: torch.Tensor, all_reduce_sum: AllReduce | None = None) -> None:
        stats = torch.tensor([xs.numel(), xs.double().sum().item(), (xs.double() ** 2).sum().item()],
                             dtype=torch.float64)
        if all_reduce_sum is not None:
            stats = all_reduce_sum(stats)
        n, total, total_sq = stats.tolist()
        if n == 0:
            return
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean ** 2, 0.0)
        new_count = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / new_count
        self.mean += delta * n / new_count
        self.var = m2 / new_count
        self.count = new_count

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))


def normalize_scores(scores: torch.Tensor, mean: float, std: float, clip: float | None) -> torch.Tensor:
    """(score - mean) / std, clipped to +-clip (0 or None: not clipped)."""
    out = (scores - mean) / max(std, 1e-8)
    return out.clamp(-clip, clip) if clip else out


def clip_scores(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    return scores.clamp(-clip, clip) if clip else scores


def missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` from the score of every answer that never emitted EOS (TRL's missing_eos_penalty)."""
    if not penalty:
        return scores
    return scores - penalty * (~ended.bool()).to(scores.dtype)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment, as a value to add to each score: 0 up to max_new_tokens - buffer tokens,
    then falling linearly to -penalty at max_new_tokens (an answer cut at the limit gets the whole -penalty)."""
    if not penalty or buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_new_tokens - buffer
    over = (lengths.float() - start).clamp(min=0, max=buffer)
    return -penalty * over / buffer


def length_penalty(lengths: torch.Tensor, per_token: float) -> torch.Tensor:
    """A length-penalised reward: per_token times each answer's length, to subtract from its score."""
    return per_token * lengths.float()


def length_runaway(lengths: list[float], rewards: list[float], growth: float, window: int = 3) -> str | None:
    """Why a run should stop because its answers grow while its reward rises (the reward model paying for length),
    or None: the mean length of the last `window` steps above (1 + growth) times that of the first, with the mean
    reward up too."""
    if len(lengths) < 2 * window:
        return None
    first_len, last_len = sum(lengths[:window]) / window, sum(lengths[-window:]) / window
    first_rew, last_rew = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    if last_len > (1 + growth) * first_len and last_rew > first_rew:
        return (f"the mean answer length grew from {first_len:.1f} to {last_len:.1f} tokens (+"
                f"{last_len / max(first_len, 1e-9) - 1:.0%}, more than --max_length_growth {growth:.0%}) while the "
                f"reward rose from {first_rew:.3f} to {last_rew:.3f}")
    return None


def place_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards [B, T]: each sequence's score on its last response token, 0 elsewhere. A row with no
    response token gets nothing."""
    lengths = mask.sum(-1)
    last = (lengths - 1).clamp(min=0).long()
    placed = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    placed.scatter_(-1, last.unsqueeze(-1), scores.float().unsqueeze(-1))
    return placed * (lengths > 0).unsqueeze(-1).float() * mask
