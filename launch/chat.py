#!/usr/bin/env python
"""Talk to a trained policy: a model folder, a LoRA adapter, a PPO --output_dir, or a built-in model name.

    python launch/chat.py --model out/ppo                       # interactive; /reset clears the history, Ctrl-D ends
    python launch/chat.py --model out/ppo --prompt "中国的首都是哪里？"   # one answer, printed
"""
import argparse
import sys

from rlhf_ds.errors import run_cli


def main(argv=None) -> int:
    from transformers import TextStreamer

    from rlhf_ds.engines.precision import resolve_precision
    from rlhf_ds.inference import Policy
    from rlhf_ds.models.loading import quiet_transformers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    run_cli(main)
