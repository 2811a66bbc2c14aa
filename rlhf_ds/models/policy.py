"""The policy a trainer starts from — the base model, a full SFT folder, or the base with an SFT LoRA adapter — as
the trainable policy or as its frozen reference. The online trainers and DPO load it the same way."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ds.errors import UserError
from rlhf_ds.models.heads import HEAD_META
from rlhf_ds.models.finetuning import apply_finetuning
from rlhf_ds.models.loading import disable_dropout, load_causal_lm
from rlhf_ds.models.saving import is_adapter_dir


@dataclass
class PolicyStart:
    """Where the policy starts: `base` (a folder), and `sft` (an adapter folder, a full model folder, or None)."""

    base: Path
    sft: str | None = None

    @property
    def adapter(self) -> str | None:
        return self.sft if self.sft and is_adapter_dir(self.sft) else None

    @property
    def weights(self) -> Path:
        """The folder holding the starting weights (a full SFT folder, else the base)."""
        return Path(self.sft) if self.sft and not self.adapter else self.base

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.sft) if self.sft else self.base

    def check(self) -> None:
        if self.sft is None:
            return
        path = Path(self.sft)
        if not path.is_dir():
            raise UserError(f"--sft_model {self.sft}: no such folder (the --output_dir of train_sft.py)")
        if (path / HEAD_META).is_file():
            raise UserError(f"--sft_model {self.sft} is a reward/value model; it must be a policy: a LoRA adapter or "
                            f"a causal-LM folder")
        if not (self.adapter or (path / "config.json").is_file()):
            raise UserError(f"--sft_model {self.sft} holds neither adapter_config.json nor config.json")


def load_policy(start: PolicyStart, dtype: torch.dtype, ds_config: dict | None, ft_args, trainable: bool,
                gradient_checkpointing: bool = False):
    """The starting policy. Trainable: LoRA keeps training the SFT adapter, or gets a new one (full and freeze
    fine-tuning apply to the weights). Frozen (a reference): the SFT adapter stays unmerged too, since merged into
    bf16 weights it would compute slightly different log-probs from the policy's, a KL that is not zero before the
    first update. Dropout is off either way."""
    from peft import PeftModel

    lora = ft_args.finetuning_type == "lora"
    if start.adapter:
        keep_adapter = (trainable and lora) or not trainable
        model = load_causal_lm(start.base, dtype, ds_config if keep_adapter else None)
        model = PeftModel.from_pretrained(model, start.adapter, is_trainable=trainable and lora)
        if not keep_adapter:
            model = model.merge_and_unload()
    else:
        model = load_causal_lm(start.weights, dtype, ds_config)
    if trainable:
        if not isinstance(model, PeftModel):
            model = apply_finetuning(model, ft_args, task_type="CAUSAL_LM")
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    disable_dropout(model)
    return model
