"""The hybrid engine: same greedy tokens as plain generation (also when copies of a prompt share one prefill),
everything restored bit for bit, the next training step identical to an engine that never switched, no hang when
ranks stop at different lengths — for ZeRO-2 and ZeRO-3 (parameters really partitioned), LoRA and full
fine-tuning, Llama and OPT. And DeepSpeed's own hybrid engine says why it cannot run here."""
import json
import sys

import pytest

from conftest import REPO, check_ok, child_env, run_tree


@pytest.fixture(scope="module")
def tiny_opt(artifacts, tokenizer_dir):
    from rlhf_ds.models import tiny

    return tiny.make_model(artifacts / "tiny-opt", tokenizer_dir, "opt")


def test_hybrid_engine_against_plain_generation_and_a_never_switched_engine(tiny_llama, tiny_opt, tmp_path):
    from rlhf_ds.dist import free_port

    out = tmp_path / "hybrid.json"
    env = child_env()
    proc = run_tree([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     str(free_port()), str(REPO / "tests" / "workers" / "hybrid_check.py"), str(out),
                     str(tiny_llama), str(tiny_opt)], timeout=300, env=env)
    check_ok(proc)
    results = json.loads(out.read_text())
    assert len(results) == 7  # Llama: 2 stages x 2 fine-tuning types + layer-by-layer gathering; OPT: ZeRO-3 x 2
    for combo, ranks in results.items():
        assert [r["new_tokens"] for r in ranks.values()] == [5, 9], combo  # different lengths, no hang
        for rank, r in ranks.items():
            where = f"{combo} rank {rank}"
            assert r["same_tokens"], where
            assert r["prompt_shared"] and r["grouped_same_tokens"], where  # GRPO's groups: one prefill per prompt
            assert r["weight_diff"] <= 1e-6, where
            assert r["hooks_kept"], where
            assert r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-6, where


def test_deepspeed_hybrid_engine_explains_why_it_cannot_run(tiny_llama, tiny_gpt2, tiny_opt, monkeypatch):
    from transformers import AutoModelForCausalLM

    from rlhf_ds.engines import hybrid

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert "CUDA inference kernels" in hybrid.deepspeed_hybrid_problem(llama)  # this machine has no GPU

    class FakeCuda:
        def device_name(self):
            return "cuda"

    monkeypatch.setattr("deepspeed.accelerator.get_accelerator", lambda: FakeCuda())
    assert hybrid.deepspeed_hybrid_problem(llama) is None
    assert "no container for this architecture (GPT2LMHeadModel)" in hybrid.deepspeed_hybrid_problem(
        AutoModelForCausalLM.from_pretrained(tiny_gpt2))
    assert "skips OPT layers" in hybrid.deepspeed_hybrid_problem(AutoModelForCausalLM.from_pretrained(tiny_opt))


def test_ppo_with_deepspeed_hybrid_engine_on_cpu_stops_at_start_up(tiny_llama, forked_cli, tmp_path):
    proc = forked_cli.run("train_ppo.py", "--model_name_or_path", str(tiny_llama), "--do_train", "--dataset",
                   "alpaca_gpt4_zh", "--output_dir", str(tmp_path / "o"), "--reward_fn",
                   "tests/reward_fns.py:ascii_letters", "--hybrid_engine", "deepspeed", "--max_steps", "1")
    assert proc.returncode == 2 and "--hybrid_engine deepspeed: DeepSpeed's hybrid engine needs its CUDA" in proc.stderr
    assert "--hybrid_engine on" in proc.stderr and "Traceback" not in proc.stderr
