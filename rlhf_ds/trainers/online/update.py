"""From a scored rollout to updated weights: per-token rewards (the KL where it belongs), advantages through the
algo/ registry, then `ppo_epochs` passes of the policy loss (and the value loss, with a critic) over shuffled
micro-batches. Every formula is in rlhf_ds/algo; this file moves tensors between the engines and those functions.
"""
from __future__ import annotations

from typing import Any

import torch

from rlhf_ds import dist
from rlhf_ds.algo.advantages import ADVANTAGE_ESTIMATORS, group_reward_std, uniform_groups
from rlhf_ds.algo.core import explained_variance, logprobs_and_entropy, masked_mean, \
    whiten_over_ranks
from rlhf_ds.algo.kl import kl_per_token, kl_reward_penalty
from rlhf_ds.algo.losses import sft_loss
from rlhf_ds.algo.policy import POLICY_LOSSES, aggregate, value_loss
from rlhf_ds.algo.sequence import position_ids_from_mask
from rlhf_ds.algo.shaping import place_scores
from rlhf_ds.data.collate import SFTCollator
from rlhf_ds.trainers.online.experience import Rollout, chunks, response_logits, response_values


@torch.no_grad()
def complete(ro: Rollout, logprobs: torch.Tensor, values: torch.Tensor | None, online, kl_coef: float,
             stats: dict[str, float]) -> None:
    """Where the KL is added and the advantages computed: the score on each answer's last token, minus
    kl_coef * KL on every token when the KL is in the reward; then the chosen estimator."""
    mask = ro.mask
    ro.logprobs = logprobs
    ro.values = values.float() * mask if values is not None else None
    rewards = place_scores(ro.normalized, mask)
    if ro.ref_logprobs is not None and not online.kl_in_loss:
        rewards = kl_reward_penalty(rewards, logprobs, ro.ref_logprobs, mask, kl_coef, online.kl_estimator)
    ro.rewards = rewards
    estimator = ADVANTAGE_ESTIMATORS[online.advantage_estimator]
    advantages, ro.returns = estimator(rewards, mask, values=ro.values, group_size=online.n_samples_per_prompt,
                                       gamma=online.gamma, lam=online.lam, all_reduce_sum=dist.all_reduce_sum)
    if estimator.needs_critic and online.whiten_advantages:
        advantages = whiten_over_ranks(advantages, mask, dist.all_reduce_sum)
    ro.advantages = advantages
    ro.loss_mask = mask
    n = online.n_samples_per_prompt
    if n > 1:
        uniform = uniform_groups(ro.scores.cpu(), n)
        stats.update(group_reward_std=group_reward_std(place_scores(ro.scores, mask).cpu(), mask.cpu(), n).mean()
                     .item(), uniform_group_share=uniform.float().mean().item())
        if online.drop_uniform_groups:
            keep = (~uniform).repeat_interleave(n).to(mask.device)
            ro.loss_mask = mask * keep.unsqueeze(-1).to(mask.dtype)
    if ro.ref_logprobs is not None:
        stats["kl"] = kl_per_token(logprobs, ro.ref_logprobs, mask, "k1").sum(-1).mean().item()  # nats per answer
    if ro.values is not None:
        stats["value_explained_variance"] = explained_variance(ro.values, ro.returns, mask).item()


def ptx_loss(actor, mb: Rollout, pad_id: int) -> torch.Tensor:
    """The supervised loss on the prompts' reference answers (PPO-ptx)."""
    batch = SFTCollator(pad_id)([{"input_ids": ids, "prompt_len": n} for ids, n in zip(mb.ptx_ids, mb.ptx_prompt_len)])
    batch = {k: v.to(dist.device()) for k, v in batch.items()}
    out = actor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False)
    return sft_loss(out.logits, batch["input_ids"], batch["loss_mask"])


def update(engines, ro: Rollout, online, micro_rows: int, kl_coef: float, pad_id: int,
           stats: dict[str, float]) -> dict[str, float]:
    """`ppo_epochs` passes over shuffled micro-batches of the rollout, one optimizer step each. A rollout made
    with fused experience (no old log-probs yet) is one micro-batch; it is completed from the first forward."""
    actor, critic = engines.actor, engines.critic
    width = ro.response.shape[1]
    if ro.logprobs is not None:  # the old log-probs came from separate forwards: advantages now
        complete(ro, ro.logprobs, ro.values, online, kl_coef, stats)
    sums: dict[str, float] = {}
    count = 0
    for _ in range(online.ppo_epochs):
        order = torch.randperm(ro.response.shape[0])
        for s in chunks(len(order), micro_rows):
            fused = ro.advantages is None  # then this single micro-batch is the whole rollout
            mb = ro if fused else ro.select(order[s])
            seq, att = mb.sequences, mb.attention_mask
            values = response_values(critic, seq, att, width) if (fused and critic is not None) else None
            logprobs, entropy = logprobs_and_entropy(response_logits(actor, seq, att, width), mb.response,
                                                     online.temperature)
            if fused:
                complete(ro, logprobs.detach(), values.detach() if values is not None else None, online, kl_coef,
                         stats)
            per_token, pg_stats = POLICY_LOSSES[online.policy_loss](
                logprobs, mb.logprobs, mb.advantages, mb.loss_mask, cliprange_low=online.cliprange_low,
                cliprange_high=online.cliprange_high)
            pg_loss = aggregate(per_token, mb.loss_mask, online.loss_agg)
            loss = pg_loss
            step_stats: dict[str, Any] = {"policy_loss": pg_loss.item(), **{k: v.item() for k, v in pg_stats.items()}}
            if online.kl_in_loss and mb.ref_logprobs is not None:
                kl_loss = aggregate(kl_per_token(logprobs, mb.ref_logprobs, mb.loss_mask, online.kl_estimator),
                                    mb.loss_mask, online.loss_agg)
                loss = loss + kl_coef * kl_loss
                step_stats["kl_loss"] = kl_loss.item()
            step_stats["entropy"] = masked_mean(entropy, mb.mask).item()
            if online.ptx_coef > 0:
                ptx = ptx_loss(actor, mb, pad_id)
                loss = loss + online.ptx_coef * ptx
                step_stats["ptx_loss"] = ptx.item()
            actor.backward(loss)
            actor.step()
            if critic is not None:
                if values is None:
                    values = response_values(critic, seq, att, width)
                v_loss, v_stats = value_loss(values, mb.values, mb.returns, mb.mask, online.cliprange_value)
                critic.backward(online.vf_coef * v_loss)
                critic.step()
                step_stats.update(value_loss=v_loss.item(), **{k: v.item() for k, v in v_stats.items()})
            for k, v in step_stats.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    return {k: v / count for k, v in sums.items()}
