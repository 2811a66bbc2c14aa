"""A rollout: the actor generates N answers to each prompt (one generation call for all of them), the reward model
and/or reward functions score them, and the reference (and, unless fused into the first training forward, the
actor and the critic) read them. Scores become per-token rewards here; advantages are computed in update.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any

import torch

from rlhf_ds import dist
from rlhf_ds.algo import shaping
from rlhf_ds.algo.core import has_eos, logprobs_from_logits, response_mask
from rlhf_ds.algo.sequence import gather_last, pad_sequences, position_ids_from_mask
from rlhf_ds.engines.ds_compat import plain_linear
from rlhf_ds.engines.sampling import SamplingSettings
from rlhf_ds.models.heads import length_corrected
from rlhf_ds.rewards import RewardFunction


@dataclass
class Rollout:
    """One rank's rollout. Rows are answers; the N answers to one prompt are consecutive rows. Per-token tensors
    are [B, T] over the response positions."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor
    response: torch.Tensor  # [B, T], pad after EOS
    mask: torch.Tensor  # 1 up to and including the first EOS
    ref_logprobs: torch.Tensor | None  # None without a reference engine
    scores: torch.Tensor  # [B] raw score (weighted sum of the reward sources, after the penalties)
    normalized: torch.Tensor  # [B] what enters the reward
    ptx_ids: list[list[int]]  # the prompts' reference answers (prompt + answer), for PPO-ptx
    ptx_prompt_len: list[int]
    # the old policy's log-probs and the old values, and what follows from them (see update.complete); None until
    # then when the experience is fused into the first training forward
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None  # mask without the groups left out of the update

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.mask], dim=1)

    def select(self, idx: torch.Tensor) -> "Rollout":
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[idx] if isinstance(v, torch.Tensor) else None if v is None else \
                [v[i] for i in idx.tolist()]
        return Rollout(**values)


def response_logits(engine, sequences: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
    """Logits at the positions that predict the response tokens, [B, T, V] (only those are computed)."""
    out = engine(input_ids=sequences, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                 logits_to_keep=n_response + 1)
    return out.logits[:, :-1]


def response_values(engine, sequences: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
    """The critic's value of the state before each response token, [B, T]."""
    values = engine(input_ids=sequences, attention_mask=attention_mask)
    return values[:, -n_response - 1:-1]


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class Scorer:
    """The reward of an answer: the weighted sum of the reward model's score and each reward function's."""

    def __init__(self, reward_engine, functions: list[RewardFunction], weights: list[float],
                 reward_meta: dict | None = None):
        self.engine, self.functions, self.weights, self.meta = reward_engine, functions, weights, reward_meta
        self.names = (["reward_model"] if reward_engine is not None else []) + [f.name for f in functions]

    @torch.no_grad()
    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompts: list[str],
                 responses: list[str], references: list[str],
                 answer_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total [B], each source's raw score {name: [B]}). answer_tokens: each answer's length in tokens, for a
        reward model that carries a length correction (trained with --length_debias regress)."""
        parts: dict[str, torch.Tensor] = {}
        if self.engine is not None:
            scores = gather_last(self.engine(input_ids=sequences, attention_mask=attention_mask), attention_mask)
            parts["reward_model"] = length_corrected(scores.float(), answer_tokens.to(scores.device),
                                                     self.meta).cpu()
        for fn in self.functions:
            parts[fn.name] = torch.tensor(fn(prompts, responses, references), dtype=torch.float32)
        total = sum(w * parts[name] for w, name in zip(self.weights, self.names))
        return total.to(sequences.device), parts


class ExperienceMaker:
    def __init__(self, engines, scorer: Scorer, tokenizer, eos_ids: list[int], sampling: SamplingSettings,
                 online, micro_prompts: int, reward_stats: shaping.RunningMoments):
        self.engines, self.scorer, self.tokenizer, self.eos_ids = engines, scorer, tokenizer, eos_ids
        self.sampling, self.online, self.micro_prompts = sampling, online, micro_prompts
        self.reward_stats = reward_stats
        self.last_texts: tuple[list[str], list[str], list[float]] = ([], [], [])

    def decode(self, response: torch.Tensor, mask: torch.Tensor) -> list[str]:
        texts = self.tokenizer.batch_decode([r[m.bool()].tolist() for r, m in zip(response, mask)],
                                            skip_special_tokens=True)
        return [t.rstrip("\ufffd") for t in texts]  # a response cut mid-character ends in a partial byte sequence

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingSettings,
               size: int, group: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
        """Answers to all rows, in generate calls of `size` rows (a multiple of `group`, the copies of each prompt);
        and the gather / generation seconds."""
        generator = self.engines.generator
        parts, timings = [], {"gather": 0.0, "generation": 0.0}
        for s in chunks(prompt_ids.shape[0], size):
            parts.append(generator.generate(prompt_ids[s], prompt_mask[s], sampling, group=group))
            for key in timings:
                timings[key] += generator.timings[key]
        width = max(p.shape[1] for p in parts)
        pad = self.tokenizer.pad_token_id
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad) for p in parts]), timings

    @torch.no_grad()
    def make(self, rows: list[dict[str, Any]], fused: bool) -> tuple[Rollout, dict[str, float]]:
        """Generate N answers per prompt and score them; the reference's log-probs; the actor's and the critic's
        unless `fused` (then the first training forward gives them: see update.py)."""
        online, engines = self.online, self.engines
        n = online.n_samples_per_prompt
        device = dist.device()
        prompt_ids, prompt_mask = pad_sequences([r["prompt_ids"] for r in rows], self.tokenizer.pad_token_id, "left")
        # each prompt n times, side by side: one generate call draws every answer, and a group stays together
        prompt_ids = prompt_ids.repeat_interleave(n, dim=0).to(device)
        prompt_mask = prompt_mask.repeat_interleave(n, dim=0).to(device)
        t0 = time.time()
        gen_prompts = online.per_device_generation_batch_size or len(rows)
        response, gen_times = self.sample(prompt_ids, prompt_mask, self.sampling, gen_prompts * n, group=n)
        t_rollout = time.time() - t0
        mask = response_mask(response, self.eos_ids)
        sequences = torch.cat([prompt_ids, response], 1)
        attention = torch.cat([prompt_mask, mask], 1)
        width = response.shape[1]
        texts = self.decode(response, mask)
        prompts = [r["prompt_text"] for r in rows for _ in range(n)]
        references = [r["reference_text"] for r in rows for _ in range(n)]
        logprobs, ref_logprobs, values, scores = [], [], [], []
        parts: dict[str, list[torch.Tensor]] = {}
        for model in (engines.actor, engines.critic):
            if model is not None:
                model.eval()
        with plain_linear():  # no backward follows these forwards
            for s in chunks(len(texts), self.micro_prompts * n):
                seq, att = sequences[s], attention[s]
                if not fused:
                    logprobs.append(logprobs_from_logits(response_logits(engines.actor, seq, att, width), response[s],
                                                         online.temperature))
                    if engines.critic is not None:
                        values.append(response_values(engines.critic, seq, att, width).float())
                if engines.ref is not None:
                    ref_logprobs.append(logprobs_from_logits(response_logits(engines.ref, seq, att, width), response[s],
                                                             online.temperature))
                total, by_source = self.scorer(seq, att, prompts[s], texts[s], references[s], mask[s].sum(-1))
                scores.append(total)
                for name, value in by_source.items():
                    parts.setdefault(name, []).append(value)
        for model in (engines.actor, engines.critic):
            if model is not None:
                model.train()
        raw = torch.cat(scores)
        ended = has_eos(response, mask, self.eos_ids)
        lengths = mask.sum(-1)
        scores_t = shaping.missing_eos_penalty(raw, ended, online.missing_eos_penalty)
        scores_t = scores_t + shaping.overlong_penalty(lengths, online.max_new_tokens, online.overlong_buffer,
                                                       online.overlong_penalty).to(scores_t.device)
        scores_t = scores_t - shaping.length_penalty(lengths, online.length_penalty).to(scores_t.device)
        if online.normalize_reward:
            self.reward_stats.update(scores_t, dist.all_reduce_sum)
            normalized = shaping.normalize_scores(scores_t, self.reward_stats.mean, self.reward_stats.std,
                                                  online.reward_clip)
        else:
            normalized = shaping.clip_scores(scores_t, online.reward_clip)
        rollout = Rollout(prompt_ids, prompt_mask, response, mask,
                          torch.cat(ref_logprobs) if ref_logprobs else None, scores_t, normalized,
                          [r["input_ids"] for r in rows for _ in range(n)],
                          [r["prompt_len"] for r in rows for _ in range(n)])
        if not fused:
            rollout.logprobs = torch.cat(logprobs)
            rollout.values = torch.cat(values) if values else None
        stats = {"reward": scores_t.mean().item(), "reward_normalized": normalized.mean().item(),
                 "response_length": lengths.float().mean().item(), "eos_rate": ended.float().mean().item(),
                 "time_gather": gen_times["gather"], "time_generation": t_rollout - gen_times["gather"],
                 "tokens": mask.sum().item(), "time_experience": time.time() - t0 - t_rollout}
        if len(self.scorer.names) > 1:
            stats.update({f"reward_{name}": torch.cat(v).mean().item() for name, v in parts.items()})
        self.last_texts = (prompts, texts, scores_t.tolist())
        return rollout, stats

