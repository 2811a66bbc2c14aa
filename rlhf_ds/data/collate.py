"""Batching tokenised examples into padded tensors, and splitting evaluation work evenly over ranks."""
from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_ds.algo.sequence import pad_sequences


class PairCollator:
    """Preference pairs -> one batch of 2B rows: the B chosen sequences, then the B rejected ones."""

    def __init__(self, pad_id: int, padding_side: str = "right"):
        self.pad_id = pad_id
        self.padding_side = padding_side

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        input_ids, attention_mask = pad_sequences(seqs, self.pad_id, self.padding_side)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "chosen_prompt_len" in rows[0]:  # answer lengths, for losses that look at them
            batch["answer_tokens"] = torch.tensor([len(r[f"{side}_ids"]) - r[f"{side}_prompt_len"]
                                                   for side in ("chosen", "rejected") for r in rows])
        if "pair_weight" in rows[0]:
            batch["pair_weight"] = torch.tensor([float(r["pair_weight"]) for r in rows])
        return batch


class PreferenceCollator:
    """Preference pairs for a policy (DPO): one batch of 2B rows, the B chosen sequences then the B rejected ones,
    with `answer_mask` marking each row's answer tokens (never the prompt or the padding). Left padding by default:
    every answer then ends at the last column, so the policy's logits are needed for the last positions only."""

    def __init__(self, pad_id: int, padding_side: str = "left"):
        self.pad_id = pad_id
        self.padding_side = padding_side

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        prompt_lens = [r["chosen_prompt_len"] for r in rows] + [r["rejected_prompt_len"] for r in rows]
        input_ids, attention_mask = pad_sequences(seqs, self.pad_id, self.padding_side)
        width = input_ids.shape[1]
        positions = torch.arange(width).unsqueeze(0)
        starts = torch.tensor([(width - len(s) if self.padding_side == "left" else 0) + p
                               for s, p in zip(seqs, prompt_lens)]).unsqueeze(1)
        answer_mask = (positions >= starts).long() * attention_mask
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask}
        for side in ("chosen", "rejected"):
            key = f"ref_{side}_logps"
            if key in rows[0]:
                batch[key] = torch.tensor([float(r[key]) for r in rows])
        return batch


class SFTCollator:
    """Prompt + answer sequences -> right-padded input_ids, attention_mask and loss_mask (1 on answer tokens only:
    the prompt and the padding never count in the loss)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences([r["input_ids"] for r in rows], self.pad_id, "right")
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        prompt_len = torch.tensor([r["prompt_len"] for r in rows]).unsqueeze(1)
        loss_mask = (positions >= prompt_len).long() * attention_mask
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def train_sampler(dataset, batch_size: int, rank: int, world: int, seed: int, group_by_length: bool):
    """Shuffled, evenly split over ranks (the tail that does not divide is dropped, so every rank runs the same
    number of steps); with group_by_length, batches hold examples of similar length (the `length` column)."""
    from torch.utils.data import DistributedSampler

    if group_by_length:
        from transformers.trainer_pt_utils import DistributedLengthGroupedSampler

        return DistributedLengthGroupedSampler(batch_size, lengths=list(dataset["length"]), num_replicas=world,
                                               rank=rank, seed=seed, drop_last=True)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)


def even_shards(n_items: int, rank: int, world: int, batch_size: int) -> list[tuple[list[int], int]]:
    """This rank's evaluation batches as (indices, n_real): every rank gets the same number of batches, since
    under ZeRO-3 each forward is a collective. Short batches are topped up with repeats of an index, and
    n_real says how many entries at the front of each batch are real."""
    mine = list(range(rank, n_items, world))
    n_batches = math.ceil(math.ceil(n_items / world) / batch_size) if n_items else 0
    batches = []
    for b in range(n_batches):
        real = mine[b * batch_size:(b + 1) * batch_size]
        filler = real[-1:] if real else [0]
        batches.append((real + filler * (batch_size - len(real)), len(real)))
    return batches
