"""Offline preference losses (DPO and its family), registered by name (`--loss_type`): pure functions of each
pair's log-probabilities of its chosen and rejected answer (summed over the answer tokens) under the policy and the
reference, and the answers' lengths in tokens.

    loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta, **options)
        -> (loss per pair [B], chosen reward [B], rejected reward [B])

The rewards are the implicit rewards each loss optimises (DPO: beta * (log pi - log pi_ref)); they are what the
reward accuracy and margin are computed from, and what eval_rm.py scores pairs with.

  sigmoid   DPO (Rafailov et al. 2023): -log sigmoid(beta * h), h = (pi_c - pi_r) - (ref_c - ref_r); with
            --label_smoothing e, conservative DPO: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
  ipo       IPO (Azar et al. 2023): (h' - 1 / (2 beta))^2 on log-probs averaged over the answer tokens (as TRL)
  hinge     SLiC's hinge (Zhao et al. 2023): relu(1 - beta * h)
  simpo     SimPO (Meng et al. 2024), no reference: -log sigmoid(beta * (avg pi_c - avg pi_r) - gamma)
  orpo      ORPO (Hong et al. 2024), no reference: NLL of the chosen answer (per token) - beta * log sigmoid(
            log odds_c - log odds_r), odds = p / (1 - p) with p the per-token-averaged probability
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from rlhf_ds.algo.core import register

PREFERENCE_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


def preference_loss(name: str, needs_reference: bool = True):
    return register(PREFERENCE_LOSSES, name, needs_reference=needs_reference)


@preference_loss("sigmoid")
def dpo_sigmoid(pc, pr, rc, rr, lc, lr, beta: float, label_smoothing: float = 0.0, **_):
    h = (pc - pr) - (rc - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


@preference_loss("ipo")
def ipo(pc, pr, rc, rr, lc, lr, beta: float, **_):
    h = (pc / lc - pr / lr) - (rc / lc - rr / lr)
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


@preference_loss("hinge")
def hinge(pc, pr, rc, rr, lc, lr, beta: float, **_):
    h = (pc - pr) - (rc - rr)
    return torch.relu(1 - beta * h), beta * (pc - rc).detach(), beta * (pr - rr).detach()


@preference_loss("simpo", needs_reference=False)
def simpo(pc, pr, rc, rr, lc, lr, beta: float, simpo_gamma: float = 0.5, **_):
    chosen, rejected = beta * pc / lc, beta * pr / lr
    return -F.logsigmoid(chosen - rejected - simpo_gamma), chosen.detach(), rejected.detach()


@preference_loss("orpo", needs_reference=False)
def orpo(pc, pr, rc, rr, lc, lr, beta: float, **_):
    avg_c, avg_r = pc / lc, pr / lr
    # log odds = log p - log(1 - p) with log p the per-token average; log1p(-exp) is exact near p -> 1
    log_odds = (avg_c - torch.log1p(-torch.exp(avg_c).clamp(max=1 - 1e-7))) - \
        (avg_r - torch.log1p(-torch.exp(avg_r).clamp(max=1 - 1e-7)))
    losses = -avg_c - beta * F.logsigmoid(log_odds)
    return losses, (beta * avg_c).detach(), (beta * avg_r).detach()
