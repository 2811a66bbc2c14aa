"""Where the actor generates. `generate` is the one entry point the PPO trainer calls for rollouts and evaluation;
the hybrid engine replaces what happens inside it, never its signature."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf_ds import dist


@dataclass
class SamplingSettings:
    max_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    suppress_eos: bool = False  # benchmarks: every answer runs to max_new_tokens
    extra: dict = field(default_factory=dict)

    def generation_config(self):
        from transformers import GenerationConfig

        kwargs = dict(max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_token_ids,
                      pad_token_id=self.pad_token_id, do_sample=self.do_sample, use_cache=True, **self.extra)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.suppress_eos:
            kwargs.update(suppress_tokens=list(self.eos_token_ids), eos_token_id=None,
                          min_new_tokens=self.max_new_tokens)
        return GenerationConfig(**kwargs)


def needs_synced_gpus(engine) -> bool:
    """Under ZeRO-3 every forward is a collective: a rank that finished early must keep stepping with the others,
    or they wait for it forever."""
    return engine.zero_optimization_partition_weights() and dist.world_size() > 1


@torch.no_grad()
def generate(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Sample continuations of left-padded prompts with the actor engine's model. Returns the generated tokens
    [B, N] (N <= max_new_tokens), padded with pad_token_id after each row's EOS."""
    was_training = engine.module.training
    engine.module.eval()
    try:
        sequences = engine.module.generate(input_ids=input_ids, attention_mask=attention_mask,
                                           generation_config=settings.generation_config(),
                                           synced_gpus=needs_synced_gpus(engine))
    finally:
        engine.module.train(was_training)
    return sequences[:, input_ids.shape[1]:]
