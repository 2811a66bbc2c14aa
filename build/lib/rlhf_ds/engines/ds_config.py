"""Build the DeepSpeed config of one engine: a shipped file from ds_configs/ (or the user's --deepspeed file)
with its "auto" values filled from the command line."""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_ds.args import shipped_dir
from rlhf_ds.errors import UserError

logger = logging.getLogger(__name__)

CONFIG_DIR = shipped_dir("ds_configs")


def on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def shipped_config_path(stage: int, offload: bool, trainable: bool) -> Path:
    if trainable:
        if stage not in (2, 3):
            raise UserError(f"ZeRO stage {stage}: the shipped training configs are for stages 2 and 3; "
                            f"pass your own with --deepspeed for other stages")
        name = f"zero{stage}{'_offload' if offload else ''}.json"
    else:
        name = "zero3_inference_offload.json" if stage == 3 and offload else (
            "zero3_inference.json" if stage == 3 else "zero0_inference.json")
    return CONFIG_DIR / name


def read_config(path: str | Path) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read DeepSpeed config {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path}: invalid JSON at line {err.lineno}, column {err.colno}: "
                        f"{err.msg}") from None
    if not isinstance(config, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    return config


@dataclass
class EngineSettings:
    """What the command line decides about one engine."""

    micro_batch: int
    grad_accum: int = 1
    precision: str = "fp32"
    max_grad_norm: float = 1.0
    lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    stage: int = 2
    world_size: int = 1
    persistence_threshold: int = 10000
    stage_is_explicit: bool = False  # a per-role flag chose the stage: it wins over a --deepspeed file


def _fill(config: dict[str, Any], key: str, value: Any, source: str, flag: str) -> None:
    """Fill config[key] if absent or "auto"; an explicit different value is a contradiction."""
    current = config.get(key, "auto")
    if current == "auto":
        config[key] = value
    elif current != value and flag:
        raise UserError(f"{source}: \"{key}\": {current} contradicts {flag} {value}; make them agree or write "
                        f"\"auto\" in the config")


def build_ds_config(base: dict[str, Any], settings: EngineSettings, source: str = "ds config") -> dict[str, Any]:
    """Fill the "auto" values of `base` (unchanged) from `settings`; check that batch sizes add up."""
    cfg = copy.deepcopy(base)
    s = settings
    _fill(cfg, "train_micro_batch_size_per_gpu", s.micro_batch, source, "--per_device_train_batch_size")
    _fill(cfg, "gradient_accumulation_steps", s.grad_accum, source, "--gradient_accumulation_steps")
    global_batch = s.micro_batch * s.grad_accum * s.world_size
    if cfg.get("train_batch_size", "auto") == "auto":
        cfg["train_batch_size"] = global_batch
    elif cfg["train_batch_size"] != global_batch:
        raise UserError(f"{source}: train_batch_size {cfg['train_batch_size']} is not micro batch {s.micro_batch} x "
                        f"accumulation {s.grad_accum} x {s.world_size} ranks = {global_batch}; fix the numbers or "
                        f"write \"auto\"")
    if "gradient_clipping" in cfg or "optimizer" in cfg:
        _fill(cfg, "gradient_clipping", s.max_grad_norm, source, "")
    for name in ("bf16", "fp16"):
        section = cfg.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = s.precision == name
        elif section["enabled"] is False and s.precision == name:
            raise UserError(f"{source}: \"{name}\": {{\"enabled\": false}} contradicts the run's precision {name}; "
                            f"write \"auto\" there, or ask for another precision")
    zero = cfg.setdefault("zero_optimization", {})
    if zero.get("stage", "auto") == "auto":
        zero["stage"] = s.stage
    if zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = s.persistence_threshold
    optimizer = cfg.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        for key, value in (("lr", s.lr), ("betas", list(s.betas)), ("eps", s.eps),
                           ("weight_decay", s.weight_decay)):
            if params.get(key, "auto") == "auto":
                params[key] = value
        if on_cpu():
            # torch's AdamW needs no C++ op compiled at start-up; its fused CPU kernel is one pass over the
            # flat fp32 partition (7M parameters: 4 ms a step against 43 ms for the default loop)
            params.setdefault("torch_adam", True)
            if params["torch_adam"]:
                params.setdefault("fused", True)
    for section in ("offload_optimizer", "offload_param"):
        if section in zero and zero[section].get("pin_memory") == "auto":
            zero[section]["pin_memory"] = not on_cpu()
    leftover = _find_auto(cfg)
    if leftover:
        raise UserError(f"{source}: cannot fill \"auto\" at {', '.join(leftover)}; write a value there")
    return cfg


def _find_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []


def engine_config(settings: EngineSettings, trainable: bool, offload: bool = False,
                  user_config: str | None = None) -> dict[str, Any]:
    """The config of one engine: the user's --deepspeed file for trainable engines when given, else ours."""
    if user_config and trainable:
        base = read_config(user_config)
        zero = base.setdefault("zero_optimization", {})
        if settings.stage_is_explicit:
            zero["stage"] = settings.stage
        else:
            settings.stage = zero.get("stage", settings.stage)
        if offload:
            logger.warning("--offload is ignored with --deepspeed %s: set offload in that file", user_config)
        return build_ds_config(base, settings, source=user_config)
    path = shipped_config_path(settings.stage, offload, trainable)
    return build_ds_config(read_config(path), settings, source=str(path))
