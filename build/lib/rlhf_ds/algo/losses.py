"""Losses as pure functions of tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry reward-model loss: mean of -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def token_nll(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of predicting tokens[:, 1:] from logits[:, :-1], kept where loss_mask[:, 1:] is 1.
    Returns (nll per position [B, T-1], zeros elsewhere; the mask [B, T-1])."""
    mask = loss_mask[:, 1:].to(torch.float32)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    return nll * mask, mask


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over the answer tokens (where loss_mask is 1): the SFT loss and PPO-ptx's."""
    nll, mask = token_nll(logits, tokens, loss_mask)
    return nll.sum() / mask.sum().clamp(min=1)
