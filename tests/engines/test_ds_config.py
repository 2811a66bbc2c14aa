"""The config builder fills "auto" from the flags and refuses numbers that do not add up."""
import pytest

from rlhf_ds.engines.ds_config import EngineSettings, build_ds_config, engine_config, read_config
from rlhf_ds.errors import UserError


def settings(**kw):
    base = dict(micro_batch=4, grad_accum=2, precision="bf16", max_grad_norm=0.5, lr=1e-4, weight_decay=0.01,
                stage=3, world_size=2)
    return EngineSettings(**{**base, **kw})


def test_shipped_configs_fill_every_auto():
    for stage in (2, 3):
        for offload in (False, True):
            cfg = engine_config(settings(stage=stage), trainable=True, offload=offload)
            assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 4
            assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 0.5
            assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
            assert cfg["optimizer"]["params"]["lr"] == 1e-4 and cfg["optimizer"]["params"]["torch_adam"] is True
            assert cfg["optimizer"]["params"]["fused"] is True  # one pass over the flat partition on CPU
            assert cfg["zero_optimization"]["stage"] == stage
            assert ("offload_optimizer" in cfg["zero_optimization"]) == offload
    frozen = engine_config(settings(stage=3), trainable=False)
    assert "optimizer" not in frozen and frozen["zero_optimization"]["stage"] == 3
    assert engine_config(settings(stage=2), trainable=False)["zero_optimization"]["stage"] == 0


def test_user_config_keeps_explicit_values_and_rejects_contradictions(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3, '
                 '"stage3_param_persistence_threshold": 0}, "optimizer": {"type": "AdamW", "params": {"lr": 3e-5}}}')
    cfg = engine_config(settings(stage=2), trainable=True, user_config=str(f))
    assert cfg["optimizer"]["params"]["lr"] == 3e-5 and cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu.*8 contradicts --per_device_train_batch_size 4"):
        build_ds_config({"train_micro_batch_size_per_gpu": 8}, settings())
    with pytest.raises(UserError, match=r"train_batch_size 30 is not micro batch 4 x accumulation 2 x 2 ranks = 16"):
        build_ds_config({"train_batch_size": 30}, settings())
    with pytest.raises(UserError, match="cannot fill"):
        build_ds_config({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}, settings())


def test_bad_config_file_is_one_line(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(UserError, match=r"invalid JSON at line 1"):
        read_config(f)


def test_deepspeeds_muon_is_imported_without_compiling_and_compiles_on_first_use():
    """import_muon_lazily: building an engine no longer loads TorchInductor's compiler for DeepSpeed's Muon module,
    and Muon's functions still go through torch.compile, once, when first called. In a fresh interpreter, so that
    nothing this test process imported earlier decides the outcome."""
    import subprocess
    import sys

    code = """
import sys, torch
from deepspeed.runtime import compiler
from rlhf_ds.engines.ds_compat import import_muon_lazily
import_muon_lazily()
from deepspeed.runtime.zero.muon import original_muon as m
assert "torch._inductor.compile_fx" not in sys.modules, "TorchInductor's compiler was loaded"
assert compiler.compile() is torch.compile, "DeepSpeed's compiler.compile was not restored"
compiled = []
torch.compile = lambda fn: compiled.append(fn) or fn
G = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
first, second = m.zeropower_via_newtonschulz5(G, 2), m.zeropower_via_newtonschulz5(G, 2)
eager = m.zeropower_via_newtonschulz5.__wrapped__
assert compiled == [eager], compiled
assert torch.equal(first, eager(G, 2)) and torch.equal(second, first)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_an_architecture_suffix_in_torch_cuda_arch_list_is_dropped_for_deepspeeds_op_builder():
    """Seen on an H200 machine: its image sets TORCH_CUDA_ARCH_LIST=9.0a, and DeepSpeed 0.19's JIT build of FusedAdam
    (every CUDA training stage) then stopped with "invalid literal for int() ... '0a'"."""
    import subprocess
    import sys

    from conftest import child_env

    code = ("import os, re, rlhf_ds; v = os.environ['TORCH_CUDA_ARCH_LIST']; print(v); "  # then DeepSpeed's parse:
            "sorted(re.split(r'[;\\s]+', v), key=lambda cc: tuple(int(p.split('+')[0]) for p in cc.split('.')))")
    for given, want in (("8.0;9.0a;10.0f+PTX", "8.0;9.0;10.0+PTX"), ("7.5 8.6", "7.5 8.6")):
        proc = subprocess.run([sys.executable, "-c", code], env=child_env(TORCH_CUDA_ARCH_LIST=given),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == want
        assert ("cannot read architecture suffixes" in proc.stderr) == (given != want)
