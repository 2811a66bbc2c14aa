"""Answering prompts with a trained policy: launch/chat.py (`rlhf-ds chat`) and the recipe's report use this."""
from __future__ import annotations

from pathlib import Path

import torch

from rlhf_ds.models.saving import is_adapter_dir
from rlhf_ds.data.template import render_prompt, resolve_template
from rlhf_ds.errors import UserError
from rlhf_ds.export import adapter_base
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


CHAT_USAGE = """Talk to a trained policy: a model folder, a LoRA adapter, an online run's --output_dir, or a built-in
model name.

    python launch/chat.py --model out/ppo                       # interactive; /reset clears the history, Ctrl-D ends
    python launch/chat.py --model out/ppo --prompt "中国的首都是哪里？"   # one answer, printed
"""


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from transformers import TextStreamer

    from rlhf_ds.engines.precision import resolve_precision
    from rlhf_ds.models.loading import quiet_transformers

    parser = argparse.ArgumentParser(prog="chat.py", description=CHAT_USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--base_model", help="for an adapter: its base model (default: as recorded in it)")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--system", help="a system message")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="bf16 where this machine runs it fast (else fp32)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="exactly this precision")
    args = parser.parse_args(argv)
    quiet_transformers()
    precision = resolve_precision(args.precision, bf16=args.bf16, model_dir=args.model)
    if args.bf16 or args.precision:
        print(f"chat: {precision.describe()}", file=sys.stderr)
    policy = Policy(args.model, args.base_model, dtype=precision.dtype)
    history = [{"role": "system", "content": args.system}] if args.system else []
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.prompt is not None:
        print(policy.answer([history + [{"role": "user", "content": args.prompt}]], **settings)[0].strip())
        return 0
    print(f"chatting with {args.model} — /reset clears the history, Ctrl-D ends", file=sys.stderr)
    streamer = TextStreamer(policy.tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        reply = policy.answer([history], streamer=streamer, **settings)[0].strip()
        history.append({"role": "assistant", "content": reply})
