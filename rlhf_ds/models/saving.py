"""Model weights out of DeepSpeed and into plain folders: gathering a (ZeRO-partitioned) state dict on rank 0 and
writing a policy the way peft / transformers load it."""
from __future__ import annotations

from pathlib import Path

import torch

from rlhf_ds import dist
from rlhf_ds.engines.ds_compat import consolidated_state_dict


def gather_state_dict(engine, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The engine's full (un-partitioned) state dict on rank 0, None on the other ranks. Collective."""
    module = engine.module
    if engine.zero_optimization_partition_weights():  # ZeRO-3
        if not trainable_only:
            return consolidated_state_dict(engine)
        import deepspeed

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            state = {n: p.detach().cpu().clone() for n, p in named} if dist.is_main() else None
        return state
    if not dist.is_main():
        return None
    state = module.state_dict()
    if trainable_only:
        keep = {n for n, p in module.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in keep}
    return {k: v.detach().cpu() for k, v in state.items()}


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def save_causal_lm(module, state: dict[str, torch.Tensor], out_dir: Path, tokenizer) -> None:
    """A policy as it trains: a peft adapter folder for LoRA, a full Hugging Face folder otherwise."""
    module.save_pretrained(str(out_dir), state_dict={k: v.contiguous() for k, v in state.items()})
    tokenizer.save_pretrained(str(out_dir))
