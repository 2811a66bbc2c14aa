"""Where the actor generates. The PPO trainer holds one generator and calls its `generate` for rollouts and
evaluation; `build_generator` picks the plain path or a hybrid engine (engines/hybrid.py) behind the same call."""
from __future__ import annotations

import time

import torch

from rlhf_ds import dist
from rlhf_ds.engines.hybrid import DeepSpeedHybridGenerator, HybridEngine
from rlhf_ds.engines.sampling import SamplingSettings
from rlhf_ds.errors import UserError


class PlainGenerator:
    """`engine.module.generate` as it is: under ZeRO-3 every decode step gathers each layer through ZeRO's hooks,
    and every rank must keep stepping until all are done (synced_gpus), or the others wait for it forever."""

    def __init__(self, engine):
        self.engine = engine
        self.timings = {"gather": 0.0, "generation": 0.0}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 settings: SamplingSettings, group: int = 1) -> torch.Tensor:
        """Continuations of left-padded prompts: [B, N <= max_new_tokens], pad after each row's EOS. (`group`, the
        hybrid engine's shared prompt, does not apply: every row is prefilled, as generate() does.)"""
        module = self.engine.module
        was_training = module.training
        module.eval()
        t0 = time.time()
        try:
            synced = bool(self.engine.zero_optimization_partition_weights()) and dist.world_size() > 1
            sequences = module.generate(input_ids=input_ids, attention_mask=attention_mask,
                                        generation_config=settings.generation_config(), synced_gpus=synced)
        finally:
            module.train(was_training)
        self.timings["generation"] = time.time() - t0
        return sequences[:, input_ids.shape[1]:]


def build_generator(engine, mode: str = "on", gather_layers: int = 0, merge_lora: str = "auto"):
    """'on': rlhf_ds's hybrid engine; 'deepspeed': DeepSpeed's (its config must have been enabled when the
    engine was built); 'off': the plain path."""
    if mode == "off":
        return PlainGenerator(engine)
    if mode == "on":
        return HybridEngine(engine, gather_layers=gather_layers, merge_lora=merge_lora)
    if mode == "deepspeed":
        return DeepSpeedHybridGenerator(engine)
    raise UserError(f"--hybrid_engine {mode!r}: choose on, deepspeed or off")
