"""Policy and value losses, and how per-token losses are averaged: pure functions, registered by name.

A policy loss returns per-token losses [B, T] and statistics; `aggregate` turns them into one number
(`--loss_agg`). Registered policy losses (`--policy_loss`):

  ppo       the clipped surrogate, max(-A r, -A clip(r, 1 - low, 1 + high)) with r = pi / pi_old; asymmetric
            bounds are DAPO's clip-higher (--cliprange_low / --cliprange_high)
  vanilla   -A r, no clipping: plain policy gradient (with one update per rollout r = 1 and the gradient is
            -A grad log pi)

Aggregations (`--loss_agg`):
  token_mean            mean over every answer token of the micro-batch (long answers weigh more)
  seq_mean_token_mean   mean over answers of each answer's token mean (GRPO's original form)
  seq_mean_token_sum    mean over answers of each answer's token sum: no length normalisation (Dr. GRPO)
"""
from __future__ import annotations

from typing import Callable

import torch

from rlhf_ds.algo.core import masked_mean, register

POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}
LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


@register(LOSS_AGGREGATIONS, "token_mean")
def token_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(loss, mask)


@register(LOSS_AGGREGATIONS, "seq_mean_token_mean")
def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_answer = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_answer.mean()


@register(LOSS_AGGREGATIONS, "seq_mean_token_sum")
def seq_mean_token_sum(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (loss * mask).sum(-1).mean()


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    return LOSS_AGGREGATIONS[mode](loss, mask)


def _ratio_stats(log_ratio: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"approx_kl": masked_mean((ratio - 1) - log_ratio, mask), "ratio": masked_mean(ratio, mask)}


@register(POLICY_LOSSES, "ppo")
def ppo_clip(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             cliprange_low: float = 0.2, cliprange_high: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate; stats: clipfrac (the clipped term chosen), clipfrac_low / clipfrac_high (the
    ratio beyond the lower bound with a negative advantage / beyond the upper one with a positive advantage)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange_low, 1.0 + cliprange_high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "clipfrac_low": masked_mean(((ratio < 1 - cliprange_low) & (advantages < 0)).float(), mask),
                 "clipfrac_high": masked_mean(((ratio > 1 + cliprange_high) & (advantages > 0)).float(), mask),
                 **_ratio_stats(log_ratio, ratio, mask)}
    return loss, stats


@register(POLICY_LOSSES, "vanilla")
def vanilla(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
            **_) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    with torch.no_grad():
        stats = _ratio_stats(log_ratio, ratio, mask)
    return -advantages * ratio, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * token mean of max((v - R)^2, (v_clipped - R)^2), v_clipped within
    +-cliprange_value of the rollout's values. Returns (loss, {vf_clipfrac})."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats
