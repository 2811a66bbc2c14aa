"""Precision is decided once from what was asked and what the hardware does fast: every branch of the rule, forced
through the same probe the stages use, whatever processor the tests run on."""
import json

import pytest
import torch

from rlhf_ds.engines import precision as P
from rlhf_ds.errors import UserError


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.delenv(P.FORCE_ENV, raising=False)
    monkeypatch.setattr(P, "on_cuda", lambda: False)
    P.probe_cpu_bf16.cache_clear()
    yield
    P.probe_cpu_bf16.cache_clear()


def fake_cpu(monkeypatch, onednn_bf16, flags=()):
    monkeypatch.setattr(P, "cpu_description", lambda: {"model": "Test CPU", "flags": list(flags),
                                                       "onednn_bf16": onednn_bf16, "threads": 2})


def test_a_cpu_without_onednn_bf16_runs_fp32_when_bf16_or_fp16_is_asked(monkeypatch):
    fake_cpu(monkeypatch, onednn_bf16=False, flags=["avx2"])
    for flags in ({"bf16": True}, {"fp16": True}):
        got = P.resolve_precision(**flags)
        assert got.name == "fp32" and got.dtype == torch.float32
        assert got.requested == f"--{next(iter(flags))}"
        assert "Test CPU" in got.reason and "no native bf16" in got.reason and "--precision bf16" in got.reason
    assert P.resolve_precision(precision="bf16").name == "bf16"  # the user knows better


def test_native_bf16_instructions_run_bf16_and_fp16_becomes_bf16(monkeypatch):
    fake_cpu(monkeypatch, onednn_bf16=True, flags=["avx512f", "avx512_bf16"])
    got = P.resolve_precision(bf16=True)
    assert got.name == "bf16" and "avx512_bf16" in got.reason
    got = P.resolve_precision(fp16=True)
    assert got.name == "bf16" and "emulate fp16" in got.reason
    assert P.resolve_precision().name == "fp32"  # nothing asked: full precision


@pytest.mark.parametrize("speedup, expected", [(0.4, "fp32"), (1.7, "bf16")])
def test_emulated_bf16_is_decided_by_measuring_the_models_shapes(monkeypatch, speedup, expected, tmp_path):
    fake_cpu(monkeypatch, onednn_bf16=True, flags=["avx512f"])  # AVX-512 without BF16: oneDNN emulates it
    shapes = []
    monkeypatch.setattr(P, "measure_bf16_speedup", lambda h, i: shapes.append((h, i)) or speedup)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 176}))
    got = P.resolve_precision(bf16=True, model_dir=tmp_path)
    assert got.name == expected and f"{speedup:.2f}x" in got.reason
    assert shapes == [(64, 176)]
    P.resolve_precision(bf16=True, model_dir=tmp_path)
    assert len(shapes) == 1  # measured once per process


def test_the_measured_probe_compares_real_products():
    ratio = P.measure_bf16_speedup(64, 128, rows=32)
    assert ratio > 0 and ratio == ratio  # a finite ratio of two timings


def test_the_forcing_variable_goes_through_the_same_probe(monkeypatch):
    fake_cpu(monkeypatch, onednn_bf16=True, flags=["avx512_bf16"])
    monkeypatch.setenv(P.FORCE_ENV, "absent")
    assert P.resolve_precision(bf16=True).name == "fp32"
    P.probe_cpu_bf16.cache_clear()
    monkeypatch.setenv(P.FORCE_ENV, "native")
    fake_cpu(monkeypatch, onednn_bf16=False)
    assert P.resolve_precision(bf16=True).name == "bf16"


def test_gpus_take_bf16_where_supported_and_fp16_with_loss_scaling_elsewhere(monkeypatch):
    monkeypatch.setattr(P, "on_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    got = P.resolve_precision(bf16=True)
    assert got.name == "fp16" and "loss scaling" in got.reason
    assert P.resolve_precision(fp16=True).name == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert P.resolve_precision(bf16=True).name == "bf16"
    assert P.resolve_precision().name == "fp32"  # only when asked


def test_contradictions_are_refused(tmp_path):
    with pytest.raises(UserError, match="exclusive"):
        P.resolve_precision(bf16=True, fp16=True)
    with pytest.raises(UserError, match="--precision fp32 contradicts --bf16"):
        P.resolve_precision(precision="fp32", bf16=True)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(UserError, match=r"ds.json enables bf16, which contradicts --fp16"):
        P.resolve_precision(fp16=True, config_precision=P.explicit_config_precision(str(config)),
                            config_source=str(config))
    got = P.resolve_precision(config_precision=P.explicit_config_precision(str(config)), config_source=str(config))
    assert got.name == "bf16" and "ds.json" in got.requested
    config.write_text(json.dumps({"bf16": {"enabled": True}, "fp16": {"enabled": True}}))
    with pytest.raises(UserError, match="both bf16 and fp16"):
        P.explicit_config_precision(str(config))
