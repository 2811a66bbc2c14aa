"""Answering prompts with a trained policy: launch/chat.py and the recipe's report use this."""
from __future__ import annotations

from pathlib import Path

import torch

from rlhf_ds.checkpoint import adapter_base, is_adapter_dir
from rlhf_ds.data.template import render_prompt, resolve_template
from rlhf_ds.errors import UserError
from rlhf_ds.models.loading import eos_token_ids, load_tokenizer, resolve_model_path


class Policy:
    """A causal LM ready to answer: a model folder, a built-in name, a LoRA adapter (merged on load), or the
    --output_dir of train_ppo.py (its actor)."""

    def __init__(self, model: str | Path, base_model: str | None = None, dtype: torch.dtype = torch.float32,
                 template: str = "auto"):
        from transformers import AutoModelForCausalLM

        path = Path(model)
        if (path / "actor").is_dir():
            path = path / "actor"
        if path.is_dir() and is_adapter_dir(path):
            from peft import PeftModel

            base = resolve_model_path(adapter_base(path, base_model))
            net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype), str(path))
            self.model = net.merge_and_unload()
            self.source = base
        elif path.is_dir() or not str(model).startswith((".", "/")):
            self.source = resolve_model_path(str(model)) if not path.is_dir() else path
            self.model = AutoModelForCausalLM.from_pretrained(str(self.source), dtype=dtype)
        else:
            raise UserError(f"--model {model}: no such folder")
        self.model.eval()
        self.tokenizer = load_tokenizer(path if path.is_dir() else self.source, padding_side="left")
        self.template = resolve_template(self.tokenizer, template)
        self.eos = eos_token_ids(self.tokenizer, self.source)

    @torch.no_grad()
    def answer(self, conversations: list[list[dict[str, str]]], max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, streamer=None) -> list[str]:
        """One answer per conversation (a list of chat messages ending with the user's turn); greedy at 0."""
        texts = [render_prompt(self.tokenizer, messages, self.template) for messages in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=self.template == "plain")
        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=self.eos, pad_token_id=self.tokenizer.pad_token_id,
                      do_sample=temperature > 0, streamer=streamer)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p)
        out = self.model.generate(**enc, **kwargs)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
