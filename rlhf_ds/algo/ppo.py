"""PPO math as pure functions of tensors: log-probs, KL estimators and controllers, reward shaping, GAE,
whitening, and the clipped losses. Nothing here knows about DeepSpeed, models or ranks (the one exception,
`RunningMoments.update`, takes its cross-rank reduction as an argument).

Shapes: B rows, T response positions. `mask` is 1 on response tokens up to and including the first EOS and 0
after it (and on pads). Position t of `logprobs`, `values`, `rewards` refers to response token t: the log-prob of
emitting it, the value of the state just before it, and the reward received for it.

Estimators and losses are registered by name, so a flag can pick them and a new one is one decorated function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def register(table: dict, name: str):
    def wrap(fn):
        table[name] = fn
        return fn

    return wrap


# ---------------------------------------------------------------------------------------------- masked statistics


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
    """(x - mean) / std over the masked positions (or with given (mean, var), e.g. reduced over ranks); masked-out
    positions come back as 0. shift_mean=False keeps the mean (rewards), True removes it (advantages)."""
    mean, var = stats if stats is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# ----------------------------------------------------------------------------------------------------- log-probs


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`. logits [B, T, V], tokens [B, T] -> [B, T] (float32).
    Dividing by the sampling temperature makes these the log-probs of the distribution actually sampled from."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, [B, T]."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


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


# ------------------------------------------------------------------------------------------------- KL estimators


@register(KL_ESTIMATORS, "k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """log p - log q: unbiased for KL(p||q) under samples from p, can be negative per token."""
    return logprobs - ref_logprobs


@register(KL_ESTIMATORS, "k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """0.5 (log p - log q)^2: biased, low variance, never negative."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register(KL_ESTIMATORS, "k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """(q/p - 1) - log(q/p): unbiased and never negative (Schulman's k3)."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - 1 - log_ratio


# ------------------------------------------------------------------------------------------------ KL controllers


class FixedKLController:
    def __init__(self, init_kl_coef: float):
        self.value = init_kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): move the coefficient so the measured KL tracks `target`, at a rate set by `horizon`
    (in samples); the proportional error is clipped to +-0.2 per update."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_controller(init_kl_coef: float, target_kl: float | None, horizon: int) -> FixedKLController:
    return AdaptiveKLController(init_kl_coef, target_kl, horizon) if target_kl else FixedKLController(init_kl_coef)


# ------------------------------------------------------------------------------------------------ reward shaping


@dataclass
class RunningMoments:
    """Mean and variance of a stream of scalars (Chan et al.'s parallel merge), optionally started from a prior
    (the reward model's stored score statistics, counted as `count` observations)."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 0.0

    def update(self, xs: torch.Tensor, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
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
    out = (scores - mean) / max(std, 1e-8)
    return out.clamp(-clip, clip) if clip else out


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL estimate on every response token, plus the sequence score on the last one.
    Returns (rewards [B, T], kl [B, T]), both 0 after EOS. Rows with no response token get no score."""
    kl = KL_ESTIMATORS[estimator](logprobs, ref_logprobs) * mask
    rewards = -kl_coef * kl
    lengths = mask.sum(-1)
    last = (lengths - 1).clamp(min=0).long()
    placed = torch.zeros_like(rewards).scatter_(-1, last.unsqueeze(-1), scores.to(rewards.dtype).unsqueeze(-1))
    rewards = rewards + placed * (lengths > 0).unsqueeze(-1).to(rewards.dtype)
    return rewards * mask, kl


# -------------------------------------------------------------------------------------------- advantages (GAE)


@register(ADVANTAGE_ESTIMATORS, "gae")
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked response tokens. The state after the last real token is
    terminal (value 0); masked positions neither add reward nor bootstrap. Returns (advantages, returns)."""
    rewards = rewards * mask
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        last_gae = last_gae * mask[:, t]  # a masked position restarts the recursion (it is after the end)
        advantages[:, t] = last_gae
    returns = advantages + values
    return advantages * mask, returns * mask


# ----------------------------------------------------------------------------------------------------- losses


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (token mean). Returns (loss, {clipfrac, approx_kl, ratio})."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over masked positions: 1 is a perfect critic, 0 predicts nothing."""
    var_returns = masked_var(returns, mask, unbiased=False)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns.clamp(min=1e-8)
