"""KL to the reference policy: per-token estimators (registered by name), where the KL enters (the reward or the
loss), and the coefficient's controllers.

Estimators of KL(p || q) per token from log p (the policy) and log q (the reference), under samples from p
(Schulman, "Approximating KL divergence"): k1 = log p - log q (unbiased, can be negative), k2 = (log p - log q)^2 / 2
(biased, low variance), k3 = q/p - 1 - log(q/p) (unbiased and never negative).

Placement (`--kl_in_loss`): in the reward, -coef * KL is added to every response token's reward (PPO, RLHF
since Ziegler et al.), so the KL is part of what the advantages estimate; in the loss, coef * KL is added to the
policy loss (GRPO), so the advantages see only the task reward and the KL's gradient flows through the log-probs.
"""
from __future__ import annotations

from typing import Callable

import torch

from rlhf_ds.algo.core import register

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
KL_PLACEMENTS = ("reward", "loss")


@register(KL_ESTIMATORS, "k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


@register(KL_ESTIMATORS, "k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


@register(KL_ESTIMATORS, "k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - 1 - log_ratio


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                 estimator: str = "k1") -> torch.Tensor:
    """The chosen estimator on every response token, 0 after EOS."""
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs) * mask


def kl_reward_penalty(rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, coef: float, estimator: str = "k1") -> torch.Tensor:
    """KL in the reward: rewards - coef * KL on every response token (the rollout's log-probs, no gradient)."""
    return (rewards - coef * kl_per_token(logprobs, ref_logprobs, mask, estimator)) * mask


# ------------------------------------------------------------------------------------------------ controllers


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
