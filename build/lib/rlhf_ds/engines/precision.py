"""Which precision a run computes in, decided once from what was asked and what the hardware does fast.

Every dtype choice in rlhf_ds goes through `resolve_precision` (stages, the recipe, eval_rm, chat, export, the
benchmarks) and `dtype_of`; engines take the dtype from their DeepSpeed config, which is filled from the result.

The rule:
  --precision bf16|fp16|fp32   exactly that (for users who know better);
  --bf16 / --fp16              mixed precision where the device runs it fast, else fp32:
      CUDA   bf16 where the device supports it, else fp16 with DeepSpeed's loss scaling (e.g. V100);
      CPU    bf16 where the processor has native bf16 matrix kernels, else fp32. fp16 matrix products are
             emulated on CPUs (about 150x slower than bf16 measured on this project's machines), so --fp16
             never runs as fp16 on a CPU. Without native bf16 (e.g. AMD EPYC or Intel with AVX2 only), bf16
             products run on slow fallbacks, 6-100x slower than fp32, and a backward pass is dominated by a
             single-threaded one: fp32 is then the fast choice;
  nothing                      fp32.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_ds.errors import UserError

logger = logging.getLogger("rlhf_ds")

PRECISIONS = ("bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Tests force the CPU probe's answer with this variable (native | absent); nobody else should need it.
FORCE_ENV = "RLHF_DS_CPU_BF16"


def dtype_of(precision: str) -> torch.dtype:
    return DTYPES[precision]


# ------------------------------------------------------------------------------------------------ the processor


@functools.lru_cache(maxsize=None)
def cpu_description() -> dict:
    """The processor as benchmark lines and logs record it: model name, the flags that decide matrix speed, and
    whether oneDNN has bf16 kernels for it."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    relevant = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16", "asimd", "sve")
                if f in flags]
    return {"model": model, "flags": relevant, "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "threads": torch.get_num_threads()}


def _time(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure_bf16_speedup(hidden: int = 896, inner: int = 2432, rows: int = 128) -> float:
    """fp32 seconds over bf16 seconds for one linear layer's forward and its two backward products at a model's
    own shape (a few milliseconds). Above 1, bf16 is faster."""
    x, w, g = torch.randn(rows, hidden), torch.randn(inner, hidden), torch.randn(rows, inner)

    def products(dtype):
        xx, ww, gg = x.to(dtype), w.to(dtype), g.to(dtype)
        return lambda: (torch.nn.functional.linear(xx, ww), gg @ ww, gg.t() @ xx)

    return _time(products(torch.float32)) / _time(products(torch.bfloat16))


@dataclass(frozen=True)
class CpuBf16:
    fast: bool
    why: str


@functools.lru_cache(maxsize=None)
def probe_cpu_bf16(hidden: int = 896, inner: int = 2432) -> CpuBf16:
    """Whether this processor runs bf16 matrix products faster than fp32, and why we think so.

    By capability first: without oneDNN bf16 kernels (AVX2-only x86) bf16 falls back to slow generic code; with the
    native instructions (AVX512-BF16, AMX) it is fast. In between (AVX-512 without BF16, Arm without the bf16
    extension) oneDNN emulates bf16, and only a measurement of the model's own shapes can tell. Cached per
    process."""
    forced = os.environ.get(FORCE_ENV)
    if forced in ("native", "absent"):
        return CpuBf16(forced == "native", f"forced by {FORCE_ENV}={forced}")
    cpu = cpu_description()
    if not cpu["onednn_bf16"]:
        return CpuBf16(False, "no native bf16 matrix kernels (oneDNN has none for this processor: AVX2 at most), "
                              "where bf16 products run 6-100x slower than fp32")
    native = [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in cpu["flags"]]
    if native:
        return CpuBf16(True, f"native bf16 matrix kernels ({native[0]})")
    speedup = measure_bf16_speedup(hidden, inner)
    verdict = "faster" if speedup >= 1.0 else "slower"
    return CpuBf16(speedup >= 1.0, f"bf16 emulated by oneDNN without native instructions; measured {verdict} than "
                                   f"fp32 at this model's shapes ({speedup:.2f}x)")


# ------------------------------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Precision:
    """What a run computes in (`name`), what the user asked for, and why the two may differ."""

    name: str
    requested: str  # as the user said it: "--bf16", "--precision fp16", "--deepspeed x.json (bf16)" or "nothing"
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def describe(self) -> str:
        return f"precision {self.name} (asked: {self.requested}; {self.reason})"

    def record(self) -> dict[str, str]:
        return {"precision": self.name, "precision_requested": self.requested, "precision_reason": self.reason}


def on_cuda() -> bool:
    return os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available()


def _model_shapes(model_dir: str | Path | None) -> tuple[int, int]:
    """hidden and MLP width from a model's config.json, for the measured probe (defaults: a 0.5B model's)."""
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, TypeError, ValueError):
        return 896, 2432
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 896
    inner = cfg.get("intermediate_size") or cfg.get("ffn_dim") or cfg.get("n_inner") or cfg.get(
        "ffn_hidden_size") or 4 * hidden
    return int(hidden), int(inner)


def _all_ranks_agree(fast: bool) -> bool:
    """Every rank must compute in the same dtype: one slow processor anywhere makes all ranks run fp32."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return fast
    from rlhf_ds import dist

    return dist.all_reduce_sum(torch.tensor([0.0 if fast else 1.0]))[0].item() == 0


def resolve_precision(precision: str | None = None, bf16: bool = False, fp16: bool = False,
                      model_dir: str | Path | None = None, config_precision: str | None = None,
                      config_source: str | None = None) -> Precision:
    """The one place a run's precision is decided (see the module docstring for the rule).

    precision: --precision (exact); bf16 / fp16: the mixed-precision flags (fast where the hardware is);
    config_precision: what a user's --deepspeed file enables explicitly ("bf16" or "fp16"), which counts as exact.
    Contradictions are refused with one line."""
    asked = [f"--{n}" for n, on in (("bf16", bf16), ("fp16", fp16)) if on]
    if len(asked) > 1:
        raise UserError("--fp16 and --bf16 are exclusive; pick one")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision and asked and asked[0] != f"--{precision}":
        raise UserError(f"--precision {precision} contradicts {asked[0]}; give one of them")
    requested = f"--precision {precision}" if precision else asked[0] if asked else "nothing"
    if config_precision:
        flag = precision or (asked[0][2:] if asked else None)
        if flag and flag != config_precision:
            raise UserError(f"--deepspeed {config_source} enables {config_precision}, which contradicts {requested}; "
                            f"write \"enabled\": \"auto\" in its {config_precision} section, or drop the flag")
        if not precision:
            precision, requested = config_precision, f"--deepspeed {config_source} ({config_precision})"
    if precision:
        reason = "as given"
        if precision == "fp16" and not on_cuda():
            reason = "as given, although CPUs emulate fp16 matrix products (far slower than bf16 or fp32)"
        return Precision(precision, requested, reason)
    if not asked:
        return Precision("fp32", requested, "full precision unless --bf16, --fp16 or --precision asks otherwise")
    want = asked[0][2:]
    if on_cuda():
        device = torch.cuda.get_device_name()
        if want == "fp16":
            return Precision("fp16", requested, "as given, with DeepSpeed's loss scaling")
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", requested, f"{device} supports bf16")
        return Precision("fp16", requested, f"{device} has no bf16: fp16 with DeepSpeed's loss scaling instead")
    probe = probe_cpu_bf16(*_model_shapes(model_dir))
    fast = _all_ranks_agree(probe.fast)
    cpu = cpu_description()["model"]
    if fast:
        note = "CPUs emulate fp16 matrix products, so bf16; " if want == "fp16" else ""
        return Precision("bf16", requested, f"{note}{cpu}: {probe.why}")
    why = probe.why if not probe.fast else "another rank's processor has no fast bf16"
    return Precision("fp32", requested, f"{cpu}: {why}; --precision bf16 forces bf16")


def explicit_config_precision(path: str | None) -> str | None:
    """"bf16" or "fp16" when a user's DeepSpeed config enables it explicitly (not "auto"), else None."""
    if not path:
        return None
    from rlhf_ds.engines.ds_config import read_config

    config = read_config(path)
    enabled = [name for name in ("bf16", "fp16") if config.get(name, {}).get("enabled") is True]
    if len(enabled) > 1:
        raise UserError(f"--deepspeed {path} enables both bf16 and fp16; keep one")
    return enabled[0] if enabled else None


def run_precision(rt, model_dir: str | Path | None = None) -> Precision:
    """A stage's precision from its RuntimeArguments (--precision, --bf16, --fp16, --deepspeed)."""
    return resolve_precision(rt.precision, rt.bf16, rt.fp16, model_dir, explicit_config_precision(rt.deepspeed),
                             rt.deepspeed)


def config_dtype(ds_config: dict) -> torch.dtype:
    """The dtype a built DeepSpeed config computes in."""
    for name in ("bf16", "fp16"):
        if ds_config.get(name, {}).get("enabled") is True:
            return DTYPES[name]
    return torch.float32
