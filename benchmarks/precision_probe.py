#!/usr/bin/env python
"""Matrix-product speed in fp32 and bf16 on this processor, at a 0.5B model's MLP shape (1024x896 by 896x4864):
the forward product and the two backward ones. Prints one JSON line with the processor and rlhf_ds's decision.

    python benchmarks/precision_probe.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/precision_probe.py   # as an AVX2-only CPU
"""
import json
import os
import time

import torch
import torch.nn.functional as F

from rlhf_ds.engines.precision import cpu_description, resolve_precision


def gflops(fn, flops: float, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return flops / ((time.perf_counter() - start) / repeats) / 1e9


def main() -> None:
    rows, hidden, inner = 1024, 896, 4864
    flops = 2 * rows * hidden * inner
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, w, g = torch.randn(rows, hidden, dtype=dtype), torch.randn(inner, hidden, dtype=dtype), \
            torch.randn(rows, inner, dtype=dtype)
        out[name] = {"forward": gflops(lambda: F.linear(x, w), flops), "grad_input": gflops(lambda: g @ w, flops),
                     "grad_weight": gflops(lambda: g.t() @ x, flops)}
        out[name] = {k: round(v, 1) for k, v in out[name].items()}
    emulation = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    print(json.dumps({"bench": "precision_probe", "shape": [rows, hidden, inner], "gflops": out,
                      "rlhf_ds_chooses_for_bf16": resolve_precision(bf16=True).name, "cpu": cpu_description(),
                      "torch": torch.__version__, **({"isa_limited_by": emulation} if emulation else {})}))


if __name__ == "__main__":
    main()
