"""Where model files are written: gathering weights out of ZeRO, and publishing folders atomically so that a
killed run never leaves something that looks like a finished model."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from rlhf_ds import dist
from rlhf_ds.errors import UserError

logger = logging.getLogger(__name__)


def gather_state_dict(engine, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The engine's full (un-partitioned) state dict on rank 0, None on the other ranks. Collective."""
    module = engine.module
    if engine.zero_optimization_partition_weights():  # ZeRO-3
        if not trainable_only:
            return engine._zero3_consolidated_16bit_state_dict()
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


def check_output_dir(output_dir: str | Path, overwrite: bool, finished_marker: str) -> Path:
    """Refuse to write over a finished run unless --overwrite_output_dir; create the folder."""
    out = Path(output_dir)
    if not str(output_dir):
        raise UserError("--output_dir is required")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    finished = out / finished_marker
    if finished.exists() and not overwrite:
        raise UserError(f"{out} already holds a finished run ({finished_marker}); pass --overwrite_output_dir to "
                        f"replace it, or choose another --output_dir")
    if dist.is_main():
        if overwrite and out.exists():
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return out


def publish_files(write: Callable[[Path], None], dest: Path, marker: str) -> None:
    """Rank 0: write(tmp) fills a temporary folder; its files then move into dest with `marker` moved last,
    so dest holds the marker only when everything else is in place."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / ".incomplete"
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != marker] + [n for n in names if n == marker]:
        target = dest / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    tmp.rmdir()


def publish_dir(write: Callable[[Path], None], dest: Path) -> None:
    """Rank 0: write(tmp) fills `dest.tmp`, which is then renamed to `dest` in one step."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def save_causal_lm(module, state: dict[str, torch.Tensor], out_dir: Path, tokenizer) -> None:
    """A policy as it trains: a peft adapter folder for LoRA, a full Hugging Face folder otherwise."""
    module.save_pretrained(str(out_dir), state_dict={k: v.contiguous() for k, v in state.items()})
    tokenizer.save_pretrained(str(out_dir))


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
    import json

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
