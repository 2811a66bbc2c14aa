"""A transformer backbone with a scalar head: one number per token. The reward model reads it at the last
token of prompt + response; the critic (value model) reads it at every response token.

A saved scalar model is a folder holding:
  adapter_config.json + adapter_model.safetensors   (LoRA on top of `base_model` in value_head.json), or
  config.json + model.safetensors                   (the whole backbone: full or freeze fine-tuning)
  value_head.safetensors                             the head's weight and bias
  value_head.json                                    written last: base model, template, score mean/std, ...
  tokenizer files
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rlhf_ds.algo.losses import head_cosine
from rlhf_ds.algo.sequence import gather_last, position_ids_from_mask
from rlhf_ds.errors import UserError
from rlhf_ds.models.loading import load_backbone, resolve_model_path

logger = logging.getLogger(__name__)

HEAD_META = "value_head.json"
HEAD_WEIGHTS = "value_head.safetensors"


class ScalarHeadModel(nn.Module):
    """`length_head`: a second head that only training sees (ODIN: it absorbs what length explains of the
    preferences); the saved model, and everything that scores with it, reads value_head alone."""

    def __init__(self, backbone: nn.Module, head_init: str = "normal", length_head: bool = False):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.bias)
        if head_init == "normal":  # N(0, 1/sqrt(d+1)) as in "Fine-Tuning Language Models from Human Preferences"
            nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden + 1))
        else:
            nn.init.zeros_(self.value_head.weight)
        self.length_head = nn.Linear(hidden, 1) if length_head else None
        if self.length_head is not None:
            nn.init.normal_(self.length_head.weight, std=1.0 / math.sqrt(hidden + 1))
            nn.init.zeros_(self.length_head.bias)
            import deepspeed

            # forward(both=True) reads both heads' weights outside their own forwards; under ZeRO-3 that needs
            # them gathered for this module's forward (a no-op otherwise)
            for weight in (self.value_head.weight, self.length_head.weight):
                deepspeed.zero.register_external_parameter(self, weight)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, both: bool = False):
        """Values for every position, float32, [batch, time]; with both=True also the length head's, and the
        cosine of the two heads' weights (ODIN's orthogonality term)."""
        hidden = self.hidden(input_ids, attention_mask)
        values = self.value_head(hidden).squeeze(-1).float()
        if both:
            return (values, self.length_head(hidden).squeeze(-1).float(),
                    head_cosine(self.value_head.weight, self.length_head.weight))
        return values

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The value at each row's last real token, [batch]."""
        return gather_last(self(input_ids, attention_mask), attention_mask)


def save_scalar_model(model: ScalarHeadModel, state_dict: dict[str, torch.Tensor], out_dir: Path,
                      meta: dict[str, Any], tokenizer=None) -> None:
    """Write `model` with the (gathered) `state_dict` into out_dir; value_head.json comes last."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    backbone_state = {k[len("backbone."):]: v.detach().cpu().contiguous() for k, v in state_dict.items()
                      if k.startswith("backbone.")}
    head_state = {k[len("value_head."):]: v.detach().cpu().float().contiguous() for k, v in state_dict.items()
                  if k.startswith("value_head.")}
    if set(head_state) != {"weight", "bias"}:
        raise RuntimeError(f"value head missing from the state dict: {sorted(head_state)}")
    model.backbone.save_pretrained(str(out_dir), state_dict=backbone_state)
    save_file(head_state, str(out_dir / HEAD_WEIGHTS))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    (out_dir / HEAD_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def length_corrected(scores: torch.Tensor, answer_tokens: torch.Tensor, meta: dict[str, Any] | None) -> torch.Tensor:
    """A reward model's scores with its stored length correction applied (--length_debias regress: the part of
    the score that answer length predicts, a slope per answer token, taken off); unchanged otherwise."""
    slope = (meta or {}).get("length_slope_per_token")
    if not slope:
        return scores
    return scores - slope * answer_tokens.to(scores.dtype)


def read_head_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / HEAD_META
    if not path.is_file():
        raise UserError(f"{model_dir} is not a finished reward/value model (no {HEAD_META}); point to the "
                        f"--output_dir of a completed train_rm.py run")
    return json.loads(path.read_text(encoding="utf-8"))


def load_scalar_model(model_dir: str | Path, dtype: torch.dtype, ds_config: dict | None = None,
                      trainable: bool = False, merge_lora: bool = False) -> tuple[ScalarHeadModel, dict[str, Any]]:
    """Load a saved scalar model. LoRA adapters stay separate unless merge_lora (not possible under ZeRO-3)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    meta = read_head_meta(model_dir)
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        base = resolve_model_path(meta["base_model"])
        backbone = PeftModel.from_pretrained(load_backbone(base, dtype, ds_config), str(model_dir),
                                             is_trainable=trainable)
        if merge_lora:
            backbone = backbone.merge_and_unload()
    else:
        backbone = load_backbone(model_dir, dtype, ds_config)
    model = ScalarHeadModel(backbone)
    head = load_file(str(model_dir / HEAD_WEIGHTS))
    model.value_head.load_state_dict({k: v.to(model.value_head.weight.dtype) for k, v in head.items()})
    model.value_head.to(dtype)
    for p in model.parameters():
        p.requires_grad_(trainable and p.requires_grad)
    return model, meta
