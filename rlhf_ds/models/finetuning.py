"""Which weights train: LoRA adapters through peft, the last layers only ('freeze'), or everything ('full')."""
from __future__ import annotations

import logging

import torch.nn as nn

from rlhf_ds.args import FinetuningArguments
from rlhf_ds.errors import UserError

logger = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the first ModuleList as long as the config's layer count."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise UserError(f"--finetuning_type freeze: cannot find the {count} transformer layers of "
                    f"{type(model).__name__}; use lora or full")


def lora_config(args: FinetuningArguments, task_type: str | None = None):
    from peft import LoraConfig

    targets = "all-linear" if args.lora_target == "all" else [t.strip() for t in args.lora_target.split(",")]
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, task_type=task_type)


def apply_finetuning(model: nn.Module, args: FinetuningArguments, task_type: str | None = None) -> nn.Module:
    """Return the model with only the weights of `args.finetuning_type` left trainable."""
    if args.finetuning_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if args.finetuning_type == "freeze":
        layers = decoder_layers(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers[-args.num_layer_trainable:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(args, task_type))
    except ValueError as err:  # e.g. target modules not found
        raise UserError(f"--lora_target {args.lora_target}: {err}") from None


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a DeepSpeed engine and/or a peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def on_attention_interface(model: nn.Module) -> bool:
    """Whether the transformers model inside runs its attention through transformers' attention interface (custom
    attention functions, 4D masks passed through, DynamicCache); ChatGLM's own code does not."""
    return bool(getattr(hf_model(model), "_supports_attention_backend", False))


def is_lora(model: nn.Module) -> bool:
    """Whether a model trains LoRA adapters: a peft model, or a scalar-head model on a peft backbone."""
    from peft import PeftModel

    return isinstance(model, PeftModel) or isinstance(getattr(model, "backbone", None), PeftModel)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; under ZeRO-3 the full sizes (ds_numel), not the local shards."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
