"""Advantage estimators, registered by name (`--advantage_estimator`). Each is a pure function

    estimator(rewards, mask, *, values=None, group_size=1, gamma=1.0, lam=0.95, all_reduce_sum=None)
        -> (advantages [B, T], returns [B, T])

of the per-token rewards (the score on each answer's last token, plus the KL penalty when the KL is in the reward).
Group estimators read rows in groups of `group_size` consecutive answers to the same prompt; a group never spans
ranks. `needs_critic` says whether an estimator reads the critic's values (only GAE): the others need no critic
engine at all.

  gae                    generalised advantage estimation with a learned value baseline (PPO)
  grpo                   (score - group mean) / group std, the same advantage on every token (DeepSeekMath)
  dr_grpo                score - group mean: no std division (Dr. GRPO, Liu et al. 2025; pair it with
                         --loss_agg seq_mean_token_sum for its "no length normalisation")
  rloo                   score - mean of the other answers to the same prompt (Ahmadian et al. 2024)
  reinforce_pp           discounted return-to-go of the token rewards, whitened over the whole batch (REINFORCE++)
  reinforce_pp_baseline  the same after subtracting the group mean of the answers' returns (REINFORCE++-baseline)
"""
from __future__ import annotations

from typing import Callable

import torch

from rlhf_ds.algo.core import AllReduce, register, whiten_over_ranks

ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}
GROUP_EPS = 1e-6


def estimator(name: str, needs_critic: bool = False, grouped: bool = False):
    return register(ADVANTAGE_ESTIMATORS, name, needs_critic=needs_critic, grouped=grouped)


@estimator("gae", needs_critic=True)
def gae(rewards: torch.Tensor, mask: torch.Tensor, *, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95,
        **_) -> tuple[torch.Tensor, torch.Tensor]:
    """The state after the last real token is terminal (value 0); masked positions neither add reward nor
    bootstrap."""
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


def sequence_scores(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each answer's total reward, [B]."""
    return (rewards * mask).sum(-1)


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} answers do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def _broadcast(per_answer: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    advantages = per_answer.unsqueeze(-1) * mask
    return advantages, advantages.clone()


@estimator("grpo", grouped=True)
def grpo(rewards: torch.Tensor, mask: torch.Tensor, *, group_size: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
    groups = _groups(sequence_scores(rewards, mask), group_size)
    if group_size == 1:
        return _broadcast(groups.view(-1), mask)
    normed = (groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + GROUP_EPS)
    return _broadcast(normed.view(-1), mask)


@estimator("dr_grpo", grouped=True)
def dr_grpo(rewards: torch.Tensor, mask: torch.Tensor, *, group_size: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
    groups = _groups(sequence_scores(rewards, mask), group_size)
    return _broadcast((groups - groups.mean(-1, keepdim=True)).view(-1), mask)


@estimator("rloo", grouped=True)
def rloo(rewards: torch.Tensor, mask: torch.Tensor, *, group_size: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
    if group_size < 2:
        raise ValueError("rloo needs at least 2 answers per prompt")
    groups = _groups(sequence_scores(rewards, mask), group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return _broadcast((groups - others).view(-1), mask)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """sum over k >= t of gamma^(k - t) r_k, over the masked tokens."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


@estimator("reinforce_pp")
def reinforce_pp(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                 all_reduce_sum: AllReduce | None = None, **_) -> tuple[torch.Tensor, torch.Tensor]:
    returns = returns_to_go(rewards, mask, gamma)
    return whiten_over_ranks(returns, mask, all_reduce_sum), returns


@estimator("reinforce_pp_baseline", grouped=True)
def reinforce_pp_baseline(rewards: torch.Tensor, mask: torch.Tensor, *, group_size: int, gamma: float = 1.0,
                          all_reduce_sum: AllReduce | None = None, **_) -> tuple[torch.Tensor, torch.Tensor]:
    returns = returns_to_go(rewards, mask, gamma)
    baseline = _groups(returns[:, 0], group_size).mean(-1, keepdim=True).expand(-1, group_size).reshape(-1)
    centred = (returns - baseline.unsqueeze(-1)) * mask
    return whiten_over_ranks(centred, mask, all_reduce_sum), returns


def group_reward_std(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """The standard deviation of the answers' total rewards within each group, [B / group_size]."""
    groups = _groups(sequence_scores(rewards, mask), group_size)
    return groups.std(-1) if group_size > 1 else torch.zeros(groups.shape[0])


def uniform_groups(scores: torch.Tensor, group_size: int, tolerance: float = 1e-6) -> torch.Tensor:
    """Groups whose answers all got the same score, [B / group_size] bool: with a group baseline their advantages
    are all 0, so they carry no learning signal (DAPO drops them)."""
    groups = _groups(scores, group_size)
    return (groups.max(-1).values - groups.min(-1).values) <= tolerance
