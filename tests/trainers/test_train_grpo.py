"""The critic-free online trainers through launch/train_grpo.py: only the engines an algorithm needs are built,
N answers per prompt stay together as a group, the group statistics and clip fractions are logged, and a rule
reward rises; the estimators and the KL placement run end to end, in one process and in two under ZeRO-3."""
import pytest

from conftest import check_ok, read_jsonl, run_cli

REWARD_FN = "tests/reward_fns.py:ascii_letters"


def grpo_args(model, out, *extra):
    return ["--model_name_or_path", str(model), "--do_train", "--dataset", "alpaca_gpt4_zh", "--output_dir", str(out),
            "--max_new_tokens", "12", "--max_prompt_length", "48", "--disable_tqdm", "--save_steps", "0", *extra]


def train_rows(out):
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def test_grpo_raises_a_rule_reward_with_the_actor_alone(tiny_llama, forked_cli, tmp_path):
    out = tmp_path / "grpo"
    proc = check_ok(forked_cli.run("train_grpo.py", *grpo_args(
        tiny_llama, out, "--reward_fn", REWARD_FN, "--finetuning_type", "full", "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "8", "--n_samples_per_prompt", "4",
        "--max_steps", "20", "--logging_steps", "5", "--cliprange_high", "0.28")))
    assert "engines: actor ZeRO-2 (no critic: grpo needs no value model; no reference: the KL coefficient is 0; " \
           "no reward: rule rewards)" in proc.stdout
    assert "critic" not in {p.name for p in out.iterdir()}
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("group_reward_std", "uniform_group_share", "clipfrac_low", "clipfrac_high", "entropy", "policy_loss"):
        assert all(key in r for r in rows), key
    assert all("value_loss" not in r and "kl" not in r for r in rows)  # no critic, no reference
    assert all(r["tokens_per_second"] > 0 for r in rows)
    reward = [r["reward"] for r in rows]
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.1, reward


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp_baseline"])
def test_other_estimators_with_the_kl_in_the_loss_build_a_reference_and_log_its_kl(tiny_llama, forked_cli, tmp_path,
                                                                                   estimator):
    out = tmp_path / estimator
    proc = check_ok(forked_cli.run("train_grpo.py", *grpo_args(
        tiny_llama, out, "--reward_fn", REWARD_FN, "--advantage_estimator", estimator, "--init_kl_coef", "0.1",
        "--finetuning_type", "lora", "--lora_target", "q_proj,v_proj", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "2", "--n_samples_per_prompt", "3", "--max_steps", "2",
        "--logging_steps", "1", "--loss_agg", "seq_mean_token_sum")))
    assert "reference ZeRO-0" in proc.stdout and "no critic" in proc.stdout
    rows = train_rows(out)
    assert len(rows) == 2 and all("kl_loss" in r and "kl" in r for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the actor starts as the reference


def test_two_processes_zero3_lora_groups_stay_together_and_the_math_reward_scores_gsm8k(tiny_llama, tmp_path):
    out = tmp_path / "grpo"
    check_ok(run_cli("train_grpo.py", *grpo_args(
        tiny_llama, out, "--reward_fn", "math,format", "--reward_weights", "1.0,0.5", "--dataset", "gsm8k_train",
        "--max_samples", "16", "--do_eval", "--eval_dataset", "gsm8k_test", "--eval_steps", "2",
        "--finetuning_type", "lora", "--zero_stage", "3", "--stage3_param_persistence_threshold", "0",
        "--per_device_train_batch_size", "2", "--n_samples_per_prompt", "2", "--max_steps", "2",
        "--logging_steps", "1", "--learning_rate", "1e-3", "--num_samples_to_log", "4"),
        nproc=2, launcher="torchrun"))
    rows = train_rows(out)
    assert len(rows) == 2 and all("reward_math" in r and "reward_format" in r for r in rows)
    evals = read_jsonl(out / "eval_results.jsonl")
    assert [e["step"] for e in evals] == [0, 2]
    assert all("eval_accuracy" in e and 0 <= e["eval_accuracy"] <= 1 for e in evals)
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) >= 2 and samples[0]["prompt"] == samples[1]["prompt"]  # a group's answers side by side


def test_the_length_penalty_reaches_the_reward_and_the_length_guard_stops_a_runaway(tiny_llama, forked_cli, tmp_path):
    out = tmp_path / "penalised"
    check_ok(forked_cli.run("train_grpo.py", *grpo_args(
        tiny_llama, out, "--reward_fn", "tests/reward_fns.py:constant", "--length_penalty", "0.01",
        "--finetuning_type", "lora", "--lora_target", "q_proj,v_proj", "--per_device_train_batch_size", "2",
        "--n_samples_per_prompt", "2", "--max_steps", "2", "--logging_steps", "1")))
    for row in train_rows(out):  # a constant score of 1, less 0.01 per answer token
        assert row["reward"] == pytest.approx(1.0 - 0.01 * row["response_length"], abs=1e-5)

    from types import SimpleNamespace

    from rlhf_ds.trainers.online.trainer import OnlineTrainer

    trainer = SimpleNamespace(history=[], online=SimpleNamespace(max_length_growth=0.5))
    rows = [{"response_length": n, "reward": r} for n, r in ((20, 0.1), (21, 0.1), (20, 0.2), (30, 0.4), (34, 0.5))]
    assert all(OnlineTrainer.stop_early(trainer, row) is None for row in rows)
    reason = OnlineTrainer.stop_early(trainer, {"response_length": 36, "reward": 0.6})
    assert reason and "grew from 20.3 to 33.3 tokens" in reason and "--max_length_growth 50%" in reason
    trainer.online.max_length_growth = None
    assert OnlineTrainer.stop_early(trainer, {"response_length": 90, "reward": 0.9}) is None
