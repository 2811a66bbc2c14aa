"""A stage's output as one plain Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads with no
rlhf_ds or peft: a LoRA adapter is merged into its base model (launch/export.py, `rlhf-ds export`).

    python launch/export.py --model_dir out/ppo --output_dir out/ppo-merged      # an online run: its actor
    python launch/export.py --model_dir out/sft --output_dir out/sft-merged [--base_model smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from rlhf_ds.models.saving import is_adapter_dir
from rlhf_ds.errors import UserError


EXPORTED = ".rlhf_ds_export"  # in every folder export writes: only such a folder is ever replaced


def publish_dir(write: Callable[[Path], None], dest: Path) -> None:
    """write(tmp) fills `dest.tmp`, which is then renamed to `dest` in one step. An existing `dest` is replaced only
    when an earlier export wrote it (or it is empty): a folder of anything else is refused, never deleted."""
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / EXPORTED).is_file())):
        raise UserError(f"--output_dir {dest} already exists and was not written by export.py; choose a new folder "
                        f"(nothing was deleted)")
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists() and (tmp / EXPORTED).is_file():
        shutil.rmtree(tmp)
    elif tmp.exists():
        raise UserError(f"{tmp} is in the way and was not written by export.py; move it")
    tmp.mkdir(parents=True)
    (tmp / EXPORTED).write_text("written by rlhf_ds export.py\n")  # first: a killed export's leftover is ours too
    write(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def export_merged_lora(base_path: str | Path, peft_config, adapter_state: dict[str, torch.Tensor], out_dir: Path,
                       tokenizer, dtype: torch.dtype = torch.float32) -> None:
    """Base weights + LoRA adapter merged into one plain Hugging Face folder, loadable with
    AutoModelForCausalLM.from_pretrained and no rlhf_ds or peft. `adapter_state` uses the peft model's own names,
    so it comes straight from a (ZeRO-gathered) state dict of the training model."""
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype)
    config = copy.deepcopy(peft_config)
    config.inference_mode = True
    peft_model = get_peft_model(model, config)
    lora_keys = {k for k in peft_model.state_dict() if "lora_" in k}
    renamed = {k: v for k, v in adapter_state.items() if k in lora_keys}
    if set(renamed) != lora_keys:
        missing = sorted(lora_keys - set(renamed))[:3]
        raise RuntimeError(f"adapter weights do not match the model: missing {missing}")
    peft_model.load_state_dict(renamed, strict=False)
    save_merged(peft_model, out_dir, tokenizer)


def save_merged(peft_model, out_dir: Path, tokenizer) -> None:
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def adapter_base(adapter_dir: str | Path, base_model: str | None = None) -> str:
    """The base model an adapter folder was trained on: as given, or as recorded in its adapter_config.json."""
    if base_model:
        return base_model
    recorded = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not recorded:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base model; pass --base_model")
    return recorded


def export_model_dir(model_dir: str | Path, out_dir: Path, base_model: str | None = None,
                     dtype: torch.dtype = torch.float32) -> Path:
    """A stage's output (a LoRA adapter, a full model folder, or a PPO --output_dir) as one plain Hugging Face
    folder, written under a temporary name and renamed when complete."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_ds.models.loading import load_tokenizer, resolve_model_path

    src = Path(model_dir)
    if (src / "actor").is_dir():  # a train_ppo.py output: its policy
        src = src / "actor"
    if not src.is_dir():
        raise UserError(f"--model_dir {model_dir}: no such folder")
    if not (is_adapter_dir(src) or (src / "config.json").is_file()):
        raise UserError(f"--model_dir {model_dir}: neither a LoRA adapter (adapter_config.json) nor a model folder "
                        f"(config.json)")
    tokenizer = load_tokenizer(src)

    def write(tmp: Path) -> None:
        if is_adapter_dir(src):
            base = resolve_model_path(adapter_base(src, base_model))
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype), str(src))
            save_merged(model, tmp, tokenizer)
        else:
            AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))

    publish_dir(write, out_dir)
    return out_dir




def main(argv: list[str] | None = None) -> int:
    from rlhf_ds.engines.precision import resolve_precision
    from rlhf_ds.models.loading import quiet_transformers

    parser = argparse.ArgumentParser(prog="export.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="a LoRA adapter, a model folder, or an online run's "
                                                           "--output_dir")
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
