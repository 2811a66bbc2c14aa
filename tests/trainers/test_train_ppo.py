"""The PPO stage end to end through launch/train_ppo.py: it optimises a reward, runs on four DeepSpeed engines over
two processes under mixed ZeRO stages, saves models that reload, and refuses bad input before building engines."""
import json
from pathlib import Path

import pytest
import torch

from conftest import check_ok, read_jsonl, run_cli

STEP_KEYS = ("step", "reward", "reward_normalized", "kl", "kl_coef", "entropy", "response_length", "eos_rate",
             "policy_loss", "value_loss", "clipfrac", "approx_kl", "value_explained_variance", "time_generation",
             "time_experience", "time_training", "tokens_per_second")
REWARD_FN = "tests/reward_fns.py:ascii_letters"


@pytest.fixture(scope="module")
def sft_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA adapter standing in for an SFT run's output (non-zero, so it changes the policy)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sft")
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_rm(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA reward model on the tiny backbone, saved the way train_rm.py saves one."""
    from rlhf_ds.args import FinetuningArguments
    from rlhf_ds.models.finetuning import apply_finetuning
    from rlhf_ds.models.heads import ScalarHeadModel, save_scalar_model
    from rlhf_ds.models.loading import load_backbone, load_tokenizer

    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(4)
    model = ScalarHeadModel(apply_finetuning(load_backbone(tiny_llama, torch.float32),
                                             FinetuningArguments(finetuning_type="lora", lora_target="q_proj,v_proj")))
    save_scalar_model(model, model.state_dict(), out,
                      {"kind": "reward", "base_model": str(tiny_llama), "finetuning_type": "lora", "template": "chat",
                       "max_length": 256, "precision": "fp32", "score_mean": 0.1, "score_std": 0.5},
                      load_tokenizer(tiny_llama))
    return out


def ppo_args(model, out, *extra):
    return ["--model_name_or_path", str(model), "--do_train", "--dataset", "alpaca_gpt4_zh", "--output_dir", str(out),
            "--max_new_tokens", "16", "--max_prompt_length", "64", "--disable_tqdm", "--save_steps", "0", *extra]


@pytest.fixture(scope="module")
def latin_rm(tiny_llama, forked_cli, tmp_path_factory) -> Path:
    """A reward model trained by train_rm.py to prefer answers written in Latin letters over answers written in
    Chinese characters (the shipped English and Chinese answers to the same kind of instruction)."""
    import json

    data = Path(__file__).resolve().parents[2] / "data"
    english = [r["output"][0] for r in json.loads((data / "comparison_gpt4_data_en.partial.json").read_text())]
    chinese = [r["output"] for r in json.loads((data / "alpaca_gpt4_data_zh.subset.json").read_text())]
    pairs = [{"instruction": "回答", "input": "", "output": [e[:200], c[:200]]} for e, c in zip(english, chinese)]
    root = tmp_path_factory.mktemp("latin_rm")
    (root / "pairs.json").write_text(json.dumps(pairs[:256], ensure_ascii=False))
    check_ok(forked_cli.run("train_rm.py", "--model_name_or_path", str(tiny_llama), "--do_train", "--dataset",
                            str(root / "pairs.json"), "--output_dir", str(root / "rm"), "--finetuning_type", "full",
                            "--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--max_steps", "24",
                            "--max_length", "96", "--disable_tqdm", "--save_steps", "0"))
    return root / "rm"


def test_ppo_raises_a_trained_reward_models_score_on_held_out_prompts(tiny_llama, latin_rm, forked_cli, tmp_path):
    out = tmp_path / "ppo"
    check_ok(forked_cli.run("train_ppo.py", *ppo_args(
        tiny_llama, out, "--reward_model", str(latin_rm), "--finetuning_type", "full", "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "4",
        "--ppo_epochs", "2", "--max_steps", "30", "--logging_steps", "5", "--init_kl_coef", "0.05",
        "--target_kl", "20", "--kl_horizon", "2000", "--do_eval", "--val_size", "16", "--eval_steps", "100")))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for row in rows:
        assert all(k in row and row[k] is not None for k in STEP_KEYS), set(STEP_KEYS) - set(row)
    evals = read_jsonl(out / "eval_results.jsonl")
    assert [e["step"] for e in evals] == [0, 30] and evals[0]["eval_samples"] == 16
    assert evals[1]["eval_reward"] > evals[0]["eval_reward"] + 0.5  # the reward model's own score, held out
    reward = [r["reward"] for r in rows]
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.5, reward
    kls = [r["kl"] for r in rows]
    # the KL penalty held the policy under the adaptive controller's target (20 nats), so the controller kept
    # lowering the coefficient; the policy did move away from the reference
    assert max(kls) < 20 and kls[-1] > 1
    coefs = [r["kl_coef"] for r in rows]
    assert all(b < a for a, b in zip(coefs, coefs[1:]))
    values = [r["value_loss"] for r in rows]  # the critic learns to predict the returns
    assert sum(values[-10:]) / 10 < sum(values[:10]) / 10, values
    samples = read_jsonl(out / "samples.jsonl")
    assert samples and {"step", "prompt", "response", "reward"} <= set(samples[0])
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "actor") is not None  # full fine-tuning: a plain HF folder


def test_two_processes_zero3_actor_and_reference_zero2_critic_offloaded_frozen_models(
        tiny_llama, sft_adapter, tiny_rm, tmp_path):
    out = tmp_path / "ppo"
    shm = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    proc = check_ok(run_cli("train_ppo.py", *ppo_args(
        tiny_llama, out, "--checkpoint_dir", str(sft_adapter), "--reward_model", str(tiny_rm),
        "--finetuning_type", "lora", "--actor_zero_stage", "3", "--critic_zero_stage", "2",
        "--stage3_param_persistence_threshold", "0", "--offload_reference_model", "--offload_reward_model",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "3",
        "--logging_steps", "1", "--learning_rate", "1e-3", "--ptx_coef", "0.5", "--enable_ema",
        "--do_eval", "--val_size", "6", "--eval_steps", "2", "--save_steps", "2", "--max_samples", "60",
        "--lr_scheduler_type", "cosine", "--fp16", "--num_samples_to_log", "6"), nproc=2, launcher="deepspeed"))
    log = proc.stdout
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm  # DeepSpeed's segments unlinked
    assert "actor     ZeRO-3" in log and "reference ZeRO-3" in log and "critic    ZeRO-2" in log
    assert "reward    ZeRO-3" in log and "--offload_reward_model" in log
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 3 and all("ptx_loss" in r for r in rows)
    assert abs(rows[0]["kl"]) < 1e-4  # the actor starts as base + SFT adapter, exactly like the reference
    evals = read_jsonl(out / "eval_results.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3] and all(e["eval_samples"] == 6 for e in evals)
    answers = read_jsonl(out / "eval_samples.jsonl")  # every held-out answer, with both rewards
    for e in evals:
        mine = [a for a in answers if a["step"] == e["step"]]
        wins = [1.0 if a["reward"] > a["reference_reward"] else 0.5 if a["reward"] == a["reference_reward"] else 0.0
                for a in mine]
        assert len(mine) == 6 and e["eval_win_rate"] == pytest.approx(sum(wins) / 6)
        assert e["eval_reward"] == pytest.approx(sum(a["reward"] for a in mine) / 6, rel=1e-5)
    for name in ("actor", "actor_merged", "actor_ema", "actor_ema_merged", "critic"):
        assert (out / name).is_dir(), out / name
    checkpoint = out / "checkpoints" / "step-2"  # the merged copies are made by export.py when wanted
    assert sorted(p.name for p in checkpoint.iterdir() if p.is_dir()) == ["actor", "actor_ema", "critic", "rng"]
    assert json.loads((out / "train_results.json").read_text())["train_steps"] == 3

    # The merged folder is a plain causal LM equal to base + the trained adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf_ds.models.heads import load_scalar_model

    ids = torch.tensor([[5, 17, 99, 400, 23]])
    merged = AutoModelForCausalLM.from_pretrained(out / "actor_merged", dtype=torch.float32).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                        out / "actor").eval()
    initial = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                        sft_adapter).eval()
    with torch.no_grad():
        got, want = merged(ids).logits, adapter(ids).logits
        # the merge of the trained adapter, not of the one PPO started from: the merged model is several times
        # closer to base + trained adapter than the trained adapter is to the initial one
        moved = (want - initial(ids).logits).abs().max().item()
        assert (got - want).abs().max().item() < moved / 4
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        assert not torch.allclose(got, base(ids).logits, atol=1e-3)  # the adapter is in there
    critic, meta = load_scalar_model(out / "critic", torch.float32)
    assert meta["kind"] == "value" and critic.score(ids, torch.ones_like(ids)).shape == (1,)


def test_bad_input_is_refused_before_any_engine_is_built(tiny_llama, tiny_gpt2, tiny_rm, forked_cli, tmp_path):
    extra = {
        "ckpt_missing": ["--checkpoint_dir", str(tmp_path / "nope"), "--reward_fn", REWARD_FN],
        "ckpt_is_rm": ["--checkpoint_dir", str(tiny_rm), "--reward_fn", REWARD_FN],
        "rm_missing": ["--reward_model", str(tmp_path / "nope")],
        "tokenizer_mismatch": ["--reward_model", str(tiny_rm)],
        "context": ["--reward_fn", REWARD_FN, "--max_new_tokens", "2000"],
        "gen_batch": ["--reward_fn", REWARD_FN, "--per_device_generation_batch_size", "3"],
        "no_reward": [],
        "bad_reward_fn": ["--reward_fn", "tests/reward_fns.py:missing"],
    }
    expected = {
        "ckpt_missing": "no such folder", "ckpt_is_rm": "is a reward/value model",
        "rm_missing": "no such folder", "tokenizer_mismatch": "different tokenizer",
        "context": "exceeds the model's context of 1024", "gen_batch": "must divide the rollout batch",
        "no_reward": "give the reward", "bad_reward_fn": "has no function 'missing'",
    }
    from rlhf_ds.models import tiny

    # a policy with another vocabulary than the reward model's
    tok = tiny.train_tokenizer(tmp_path / "tok", vocab_size=1500)
    other = tiny.make_model(tmp_path / "other", tmp_path / "tok", "llama")
    assert len(tok) == 1500
    runs = [("train_ppo.py", ppo_args(other if case == "tokenizer_mismatch" else tiny_llama, tmp_path / case,
                                      "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                      *extra[case])) for case in extra]
    for case, proc in zip(extra, forked_cli.run_many(runs)):  # independent refusals, two at a time
        assert proc.returncode == 2, case + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
        assert expected[case] in proc.stderr and "Traceback" not in proc.stderr + proc.stdout, case
        assert "ZeRO-" not in proc.stdout, case  # no engine was built


def test_fused_experience_trains_exactly_like_separate_forwards(tiny_llama, tiny_rm, forked_cli, tmp_path):
    """With one optimizer step per rollout the old log-probs and values are taken from the first training forward;
    every logged figure and the trained weights must equal those of a run that computes them in make_experience."""
    runs = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        proc = check_ok(forked_cli.run("train_ppo.py", *ppo_args(
            tiny_llama, out, "--reward_model", str(tiny_rm), "--finetuning_type", "lora", "--lora_target",
            "q_proj,v_proj", "--learning_rate", "5e-3", "--per_device_train_batch_size", "4", "--max_steps", "3",
            "--logging_steps", "1", "--fuse_experience", mode)))
        assert ("come from the first training forward" in proc.stderr + proc.stdout) == (mode == "auto")
        runs[mode] = ([r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"],
                      saved_tensors(out / "actor"), saved_tensors(out / "critic"))
    (fused, actor_f, critic_f), (plain, actor_p, critic_p) = runs["auto"], runs["off"]
    keys = [k for k in STEP_KEYS if not k.startswith("time_") and k != "tokens_per_second"]
    assert len(fused) == len(plain) == 3
    for a, b in zip(fused, plain):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a[k], b[k])  # metrics.jsonl keeps 6 digits
    # the comparison saw real updates: the critic moved away from the reward model it started as, the adapter moved
    start = saved_tensors(tiny_rm)
    moved = [n for n in critic_f if n in start and (critic_f[n] - start[n]).abs().max() > 1e-6]
    assert "value_head.safetensors:weight" in moved and any("lora_B" in n for n in moved), moved
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in actor_f.items())
    for got, want in ((actor_f, actor_p), (critic_f, critic_p)):
        assert got.keys() == want.keys() and got
        for name in got:
            assert torch.allclose(got[name], want[name], atol=1e-5), (name, (got[name] - want[name]).abs().max())


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor a saved actor or critic folder holds (adapter, value head)."""
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v.float() for k, v in load_file(f).items()})
    for f in sorted(Path(folder).glob("*.bin")):
        tensors.update({f"{f.name}:{k}": v.float() for k, v in torch.load(f, weights_only=True).items()})
    return tensors
