#!/usr/bin/env python
"""Turn a stage's output into one plain Hugging Face folder (AutoModelForCausalLM.from_pretrained loads it; no
rlhf_ds or peft needed): a LoRA adapter is merged into its base model.

    python launch/export.py --model_dir out/ppo --output_dir out/ppo-merged      # a PPO run: its actor
    python launch/export.py --model_dir out/sft --output_dir out/sft-merged [--base_model smollm2-135m-instruct]
"""
import argparse

from rlhf_ds.errors import run_cli


def main(argv=None) -> int:
    from pathlib import Path

    from rlhf_ds.checkpoint import export_model_dir
    from rlhf_ds.engines.precision import resolve_precision
    from rlhf_ds.models.loading import quiet_transformers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="a LoRA adapter, a model folder, or a PPO --output_dir")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--base_model", help="the adapter's base model (default: as recorded in the adapter)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="dtype of the saved weights "
                        "(default fp32)")
    parser.add_argument("--bf16", action="store_true", help="the same as --precision bf16")
    args = parser.parse_args(argv)
    quiet_transformers()
    precision = resolve_precision(precision=args.precision or ("bf16" if args.bf16 else "fp32"))
    out = export_model_dir(args.model_dir, Path(args.output_dir), args.base_model, precision.dtype)
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
