"""Wrap a model in a DeepSpeed engine: trainable (optimizer + LR schedule) or frozen (inference only)."""
from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from rlhf_ds.engines.ds_compat import import_muon_lazily
from rlhf_ds.engines.precision import config_dtype

logger = logging.getLogger(__name__)

_NO_DECAY = ("bias", "norm", "ln_", "layernorm")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed weights and undecayed biases / norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(t in name.lower() for t in _NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _cast_unpartitioned(model: nn.Module, ds_config: dict[str, Any]) -> None:
    """Give every parameter the engine's dtype. DeepSpeed casts the module itself under ZeRO-0/1/2, but under
    ZeRO-3 parameters already partitioned at load (zero.Init) are left alone and ones added later (peft keeps
    LoRA weights in fp32, a new value head) would keep their own dtype and break the matrix products."""
    dtype = config_dtype(ds_config)
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def create_train_engine(model: nn.Module, ds_config: dict[str, Any], *, scheduler_type: str,
                        warmup_steps: int, total_steps: int):
    """A DeepSpeed engine that trains `model`'s trainable parameters with AdamW and the named LR schedule."""
    import deepspeed
    from transformers import get_scheduler

    def make_scheduler(optimizer):
        return get_scheduler(scheduler_type, optimizer, num_warmup_steps=warmup_steps,
                             num_training_steps=max(total_steps, 1))

    _cast_unpartitioned(model, ds_config)
    import_muon_lazily()
    weight_decay = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                      config=ds_config, lr_scheduler=make_scheduler)
    return engine


def create_inference_engine(model: nn.Module, ds_config: dict[str, Any]):
    """A DeepSpeed engine for a frozen model (reference, reward): partitioned under ZeRO-3, no optimizer."""
    import deepspeed

    for p in model.parameters():
        p.requires_grad_(False)
    _cast_unpartitioned(model, ds_config)
    import_muon_lazily()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine

