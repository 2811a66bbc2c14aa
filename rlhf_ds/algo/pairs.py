"""How well scores rank preference pairs, and how much of that is answer length: pure functions of the chosen and
rejected scores and texts (a reward model's scores, or a DPO policy's implicit rewards).

Beside accuracy and "the longer answer wins" on the same pairs: the accuracy on the pairs whose chosen answer is
the shorter one (where length misleads) and on those where it is the longer one, their mean (a length-balanced
accuracy: 0.5 for a pure length detector, whatever the data's mix), and the rank correlation between score and
length over every answer (near 1: the score mostly counts characters).
"""
from __future__ import annotations

import torch

from rlhf_ds.algo.losses import pairwise_loss


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), as Spearman's correlation uses them."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); 0 when either side is constant."""
    ra, rb = torch.tensor(ranks(a), dtype=torch.float64), torch.tensor(ranks(b), dtype=torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denom if denom else 0.0


def pair_metrics(chosen: list[float], rejected: list[float], chosen_text: list[str], rejected_text: list[str],
                 prefix: str = "eval_") -> dict[str, float]:
    c = torch.tensor(chosen, dtype=torch.float64)
    r = torch.tensor(rejected, dtype=torch.float64)
    right = (c > r).double()
    longer = [1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0
              for a, b in zip(chosen_text, rejected_text)]
    shorter_idx = [i for i, (a, b) in enumerate(zip(chosen_text, rejected_text)) if len(a) < len(b)]
    longer_idx = [i for i, (a, b) in enumerate(zip(chosen_text, rejected_text)) if len(a) > len(b)]
    both = torch.cat([c, r])
    out = {
        f"{prefix}accuracy": right.mean().item(),
        f"{prefix}length_baseline_accuracy": sum(longer) / len(longer),
        f"{prefix}loss": pairwise_loss(c, r).item(),
        f"{prefix}samples": len(chosen),
        f"{prefix}score_mean": both.mean().item(),
        f"{prefix}score_std": both.std().item() if len(both) > 1 else 0.0,
        f"{prefix}chosen_score_mean": c.mean().item(),
        f"{prefix}rejected_score_mean": r.mean().item(),
        f"{prefix}chosen_shorter_pairs": len(shorter_idx),
        f"{prefix}score_length_correlation": spearman(both.tolist(),
                                                      [float(len(t)) for t in [*chosen_text, *rejected_text]]),
    }
    if shorter_idx:
        out[f"{prefix}accuracy_chosen_shorter"] = right[shorter_idx].mean().item()
    if longer_idx:
        out[f"{prefix}accuracy_chosen_longer"] = right[longer_idx].mean().item()
    if shorter_idx and longer_idx:
        out[f"{prefix}length_balanced_accuracy"] = (out[f"{prefix}accuracy_chosen_shorter"]
                                                    + out[f"{prefix}accuracy_chosen_longer"]) / 2
    return out
