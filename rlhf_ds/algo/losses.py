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


def weighted_pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The Bradley-Terry loss with a weight per pair (normalised to mean 1 over the batch)."""
    weights = weights.float() / weights.float().mean().clamp(min=1e-8)
    return -(weights * F.logsigmoid(chosen.float() - rejected.float())).mean()


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson's correlation of two vectors (differentiable); 0 when either is constant."""
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    return (x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-8)


def head_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cosine of two head weight vectors (differentiable); 0 when either is zero."""
    a, b = a.flatten().float(), b.flatten().float()
    return (a @ b) / (a.norm() * b.norm()).clamp(min=1e-8)


def odin_loss(quality: torch.Tensor, length_part: torch.Tensor, lengths: torch.Tensor, cosine: torch.Tensor,
              coef: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ODIN (Chen et al. 2024): two heads on one backbone, their sum trained on the preferences; the length head is
    pushed to correlate with the answers' lengths and the quality head away from them, and the two heads' weights
    to be orthogonal (`cosine`: head_cosine of the two weights, taken where the weights are whole, i.e. inside the
    model's forward under ZeRO-3). Rows are the B chosen answers then the B rejected ones; PPO then reads the
    quality head only. Returns (loss, {rank_loss, quality_length_corr, length_head_corr, head_cosine})."""
    total = quality + length_part
    chosen, rejected = total.chunk(2)
    rank = pairwise_loss(chosen, rejected)
    rho_q, rho_l = pearson(quality, lengths), pearson(length_part, lengths)
    loss = rank + coef * (rho_q.abs() - rho_l + cosine.abs())
    return loss, {"rank_loss": rank.detach(), "quality_length_corr": rho_q.detach(),
                  "length_head_corr": rho_l.detach(), "head_cosine": cosine.detach()}


def length_slope(scores: list[float], lengths: list[float]) -> float:
    """The least-squares slope of score on length: how much a token of length adds to the score."""
    n = len(scores)
    mean_s, mean_l = sum(scores) / n, sum(lengths) / n
    var = sum((x - mean_l) ** 2 for x in lengths)
    return sum((x - mean_l) * (s - mean_s) for x, s in zip(lengths, scores)) / var if var else 0.0
