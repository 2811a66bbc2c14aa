"""How the actor samples: the settings every generation path (plain, hybrid, DeepSpeed's) takes."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingSettings:
    max_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True

    def generation_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, eos_token_id=self.eos_token_ids,
                      pad_token_id=self.pad_token_id, do_sample=self.do_sample, use_cache=True)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs

    def generation_config(self):
        from transformers import GenerationConfig

        return GenerationConfig(**self.generation_kwargs())
