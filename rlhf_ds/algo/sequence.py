"""Index arithmetic on padded batches, correct under left and right padding."""
from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row; pads get 0 (they are masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (non-pad) token of each row."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values[b, last_token_index[b]] for a [batch, time] tensor."""
    return values.gather(-1, last_token_index(attention_mask).unsqueeze(-1)).squeeze(-1)


def pad_sequences(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into input_ids and attention_mask, on the left or the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if side == "left":
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
        else:
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
    return ids, mask


class SharedPromptPairs:
    """Preference pairs packed so that each prompt goes through the model once: row i is
    [prompt_i (left-padded to P) | chosen_i (right-padded to A) | rejected_i (right-padded to A)], with a 4D mask
    under which the rejected answer sees the prompt but not the chosen answer, and position ids that restart after
    the prompt for each answer. The logits of the last 2A + 1 positions (`logits_to_keep`) then hold, at
    `chosen_index` and `rejected_index`, the predictions of every chosen and rejected answer token (the first of
    each is predicted by the prompt's last position). Built from PreferenceCollator's batch of 2B rows (the B chosen
    sequences, then the B rejected ones)."""

    def __init__(self, prompts: list[torch.Tensor], chosen: list[torch.Tensor], rejected: list[torch.Tensor],
                 pad_id: int):
        b = len(prompts)
        p = max(len(x) for x in prompts)
        a = max(len(x) for x in chosen + rejected)
        device = prompts[0].device
        self.input_ids = torch.full((b, p + 2 * a), pad_id, dtype=torch.long, device=device)
        real = torch.zeros((b, p + 2 * a), dtype=torch.bool, device=device)
        self.position_ids = torch.zeros((b, p + 2 * a), dtype=torch.long, device=device)
        self.targets = torch.full((2 * b, a), pad_id, dtype=torch.long, device=device)
        self.target_mask = torch.zeros((2 * b, a), dtype=torch.long, device=device)
        for i in range(b):
            n = len(prompts[i])
            self.input_ids[i, p - n:p] = prompts[i]
            real[i, p - n:p] = True
            self.position_ids[i, p - n:p] = torch.arange(n, device=device)
            for side, answer in enumerate((chosen[i], rejected[i])):
                start, m = p + side * a, len(answer)
                self.input_ids[i, start:start + m] = answer
                real[i, start:start + m] = True
                self.position_ids[i, start:start + m] = torch.arange(n, n + m, device=device)
                self.targets[side * b + i, :m] = answer
                self.target_mask[side * b + i, :m] = 1
        segment = torch.zeros(p + 2 * a, dtype=torch.long, device=device)
        segment[p:p + a], segment[p + a:] = 1, 2
        t = torch.arange(p + 2 * a, device=device)
        visible = (t.unsqueeze(0) <= t.unsqueeze(1)) & ((segment.unsqueeze(0) == 0) |
                                                         (segment.unsqueeze(0) == segment.unsqueeze(1)))  # [q, k]
        # a padding query sees itself, so that no softmax row is empty (its output is never read)
        self.mask = (visible.unsqueeze(0) & real.unsqueeze(1)) | torch.eye(p + 2 * a, dtype=torch.bool,
                                                                            device=device).unsqueeze(0)
        self.logits_to_keep = 2 * a + 1
        self.chosen_index = torch.arange(a, device=device)
        self.rejected_index = torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                                         torch.arange(a + 1, 2 * a, device=device)])

    @classmethod
    def from_batch(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_mask: torch.Tensor,
                   pad_id: int) -> "SharedPromptPairs | None":
        """The packed form of a PreferenceCollator batch, or None when a pair's two prompts differ (truncation can
        cut them differently)."""
        b = input_ids.shape[0] // 2
        real, answer = attention_mask.bool(), answer_mask.bool()
        prompts, answers = [], []
        for row in range(2 * b):
            prompts.append(input_ids[row][real[row] & ~answer[row]])
            answers.append(input_ids[row][answer[row]])
        if any(not torch.equal(prompts[i], prompts[b + i]) or len(prompts[i]) == 0 for i in range(b)):
            return None
        return cls(prompts[:b], answers[:b], answers[b:], pad_id)

    def tokens(self) -> int:
        return self.input_ids.numel()

    def answer_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """From the model's logits of the last 2A + 1 positions [B, 2A+1, V] to the predictions of every answer
        token [2B, A, V], rows ordered as the collator's (chosen, then rejected)."""
        return torch.cat([logits[:, self.chosen_index], logits[:, self.rejected_index]])

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as [B, 1, T, T] additive biases (0 where visible), which eager and SDPA attention both take."""
        bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
        return bias.masked_fill_(~self.mask, torch.finfo(dtype).min).unsqueeze(1)
