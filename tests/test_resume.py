"""Resumable runs: a run killed with SIGKILL and restarted with the same command logs the same per-step metrics and
ends with the same weights as one that was never interrupted; a kill during a save leaves a resumable folder;
SIGTERM to the launcher saves and stops every rank; an incompatible resumption is refused with what differs."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, check_ok, child_env, copy_run, read_jsonl, run_cli, start_cli
from rlhf_ds.checkpoint import latest_checkpoint
from rlhf_ds.dist import free_port

COMPARED = {"rm": ("loss", "accuracy", "chosen_score", "rejected_score", "learning_rate"),
            "ppo": ("reward", "reward_normalized", "kl", "kl_coef", "policy_loss", "value_loss", "entropy",
                    "approx_kl", "response_length")}


def rm_args(model, out, *extra):
    return ["--model_name_or_path", str(model), "--do_train", "--dataset", "comparison_gpt4_en", "--max_samples", "96",
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "8", "--save_steps", "2",
            "--logging_steps", "1", "--learning_rate", "1e-3", "--max_length", "96", "--disable_tqdm",
            "--finetuning_type", "lora", *extra]


def ppo_args(model, out, *extra):
    return ["--model_name_or_path", str(model), "--do_train", "--dataset", "alpaca_gpt4_zh", "--max_samples", "64",
            "--output_dir", str(out), "--reward_fn", "tests/reward_fns.py:ascii_letters", "--finetuning_type", "lora",
            "--lora_target", "q_proj,v_proj,lm_head", "--actor_zero_stage", "3", "--critic_zero_stage", "2",
            "--stage3_param_persistence_threshold", "0", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--ppo_epochs", "2", "--max_steps", "6", "--save_steps", "2",
            "--logging_steps", "1", "--learning_rate", "5e-3", "--max_new_tokens", "6", "--max_prompt_length", "32",
            "--disable_tqdm", "--enable_ema", "--target_kl", "1", "--kl_horizon", "100", *extra]


def train_rows(out):
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def assert_same_run(a, b, keys, weights):
    rows_a, rows_b = train_rows(a), train_rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], abs=1e-5, rel=1e-5), (ra["step"], key, ra[key], rb[key])
    for rel in weights:
        wa, wb = load_file(str(a / rel)), load_file(str(b / rel))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)


def test_reward_model_killed_after_a_step_resumes_exactly(tiny_llama, rm_straight, rm_killed, tmp_path):
    straight, killed = rm_straight, copy_run(rm_killed, tmp_path / "killed")
    assert latest_checkpoint(killed).name == "step-4" and not (killed / "value_head.json").exists()
    again = check_ok(run_cli("train_rm.py", *rm_args(tiny_llama, killed)))
    assert "resuming from" in again.stdout and "step 4 of 8" in again.stdout
    assert_same_run(straight, killed, COMPARED["rm"], ["adapter_model.safetensors", "value_head.safetensors"])


def test_kill_during_a_save_leaves_the_previous_checkpoint_usable(tiny_llama, rm_straight, tmp_path):
    straight, killed = rm_straight, tmp_path / "killed"
    proc = run_cli("train_rm.py", *rm_args(tiny_llama, killed), env={"RLHF_DS_DIE_AT": "save:4"})
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "checkpoints" / "step-4.tmp").is_dir()  # the half-written one is not taken for complete
    assert latest_checkpoint(killed).name == "step-2"
    again = check_ok(run_cli("train_rm.py", *rm_args(tiny_llama, killed)))
    assert "step 2 of 8" in again.stdout
    assert_same_run(straight, killed, COMPARED["rm"], ["adapter_model.safetensors", "value_head.safetensors"])
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["latest", "step-2", "step-4", "step-6"]


def test_ppo_zero3_lora_two_processes_killed_and_resumed_exactly(tiny_llama, forked_cli, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = start_cli("train_ppo.py", *ppo_args(tiny_llama, straight), nproc=2, launcher="torchrun")
    proc = run_cli("train_ppo.py", *ppo_args(tiny_llama, killed), nproc=2, launcher="torchrun",
                   env={"RLHF_DS_DIE_AT": "step:3"})
    check_ok(uninterrupted.result())
    assert proc.returncode != 0 and latest_checkpoint(killed).name == "step-2"
    again = check_ok(run_cli("train_ppo.py", *ppo_args(tiny_llama, killed), nproc=2, launcher="torchrun"))
    assert "resuming from" in again.stdout
    assert_same_run(straight, killed, COMPARED["ppo"],
                    ["actor/adapter_model.safetensors", "actor_ema/adapter_model.safetensors",
                     "critic/adapter_model.safetensors", "critic/value_head.safetensors"])
    # any checkpoint exports to a plain folder (its LoRA adapter merged into the base model)
    exported = tmp_path / "exported"
    check_ok(forked_cli.run("export.py", "--model_dir", str(killed / "checkpoints" / "step-4"), "--output_dir",
                     str(exported)))
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(exported) is not None


def test_grpo_without_a_critic_zero3_two_processes_killed_and_resumed_exactly(tiny_llama, tmp_path):
    """A critic-free run checkpoints its actor alone (no critic engine, no reference with a KL coefficient of 0)
    and resumes to the same figures and weights."""
    def grpo_args(out):
        return ["--model_name_or_path", str(tiny_llama), "--do_train", "--dataset", "alpaca_gpt4_zh",
                "--max_samples", "64", "--output_dir", str(out), "--reward_fn", "tests/reward_fns.py:ascii_letters",
                "--finetuning_type", "lora", "--lora_target", "q_proj,v_proj,lm_head", "--zero_stage", "3",
                "--stage3_param_persistence_threshold", "0", "--per_device_train_batch_size", "2",
                "--n_samples_per_prompt", "3", "--max_steps", "5", "--save_steps", "2", "--logging_steps", "1",
                "--learning_rate", "5e-3", "--max_new_tokens", "6", "--max_prompt_length", "32", "--disable_tqdm"]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = start_cli("train_grpo.py", *grpo_args(straight), nproc=2, launcher="torchrun")
    proc = run_cli("train_grpo.py", *grpo_args(killed), nproc=2, launcher="torchrun", env={"RLHF_DS_DIE_AT": "step:3"})
    check_ok(uninterrupted.result())
    assert proc.returncode != 0 and latest_checkpoint(killed).name == "step-2"
    assert sorted(p.name for p in latest_checkpoint(killed).iterdir() if p.is_dir()) == ["actor", "rng"]
    again = check_ok(run_cli("train_grpo.py", *grpo_args(killed), nproc=2, launcher="torchrun"))
    assert "resuming from" in again.stdout
    assert_same_run(straight, killed, ("reward", "policy_loss", "entropy", "group_reward_std", "response_length",
                                       "clipfrac"), ["actor/adapter_model.safetensors"])


def rank_processes(launcher_pid):
    """The training processes under a `deepspeed` launcher (runner -> node launcher -> one process per rank)."""
    import psutil

    return [p for p in psutil.Process(launcher_pid).children(recursive=True)
            if any(arg.endswith("train_rm.py") for arg in p.cmdline()) and "deepspeed.launcher.launch" not in
            " ".join(p.cmdline())]


@pytest.mark.parametrize("target", ["one rank", "node launcher"])
def test_sigterm_saves_a_checkpoint_and_stops_every_rank(target, tiny_llama, tmp_path):
    """SIGTERM to a single rank (SLURM signalling one task) or to the node launcher (which forwards it to every
    rank): all ranks finish the same step, save together and exit with code 75."""
    import psutil

    out = tmp_path / "run"
    args = rm_args(tiny_llama, out)
    args[args.index("--max_steps") + 1] = "400"
    args[args.index("--save_steps") + 1] = "1000"
    env = child_env()
    cmd = [str(os.path.join(os.path.dirname(sys.executable), "deepspeed")), "--num_gpus", "2", "--master_port",
           str(free_port()), str(REPO / "launch" / "train_rm.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(train_rows(out)) >= 3):
            time.sleep(0.5)
        ranks = rank_processes(proc.pid)
        assert len(ranks) == 2
        if target == "one rank":
            ranks[-1].send_signal(signal.SIGTERM)
        else:
            launchers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                         if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
            launchers[0].send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and 3 <= int(ckpt.name.split("-")[1]) < 400, output[-3000:]
    assert "SIGTERM received: checkpoint saved" in output, output[-3000:]
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in ranks)  # every rank is gone
    assert len(train_rows(out)) == int(ckpt.name.split("-")[1])
    if target == "one rank":
        assert proc.returncode == 75  # the distinct "preempted, resume me" code reaches the shell


@pytest.mark.parametrize("change", ["model", "zero_stage", "world_size"])
def test_incompatible_resumption_is_refused_with_what_differs(change, tiny_llama, tiny_gpt2, rm_killed, forked_cli,
                                                              tmp_path):
    out = copy_run(rm_killed, tmp_path / "run")
    if change == "model":
        proc = forked_cli.run("train_rm.py", *rm_args(tiny_gpt2, out))
        expected = "model: checkpoint"
    elif change == "zero_stage":
        proc = forked_cli.run("train_rm.py", *rm_args(tiny_llama, out, "--zero_stage", "3"))
        expected = "zero_stage: checkpoint 2, now 3; pass --universal_checkpoint"
    else:
        proc = run_cli("train_rm.py", *rm_args(tiny_llama, out), nproc=2, launcher="torchrun")
        expected = "world_size: checkpoint 1, now 2; pass --universal_checkpoint"
    # a single process exits with the usage-error code 2; torchrun reports any rank's failure as 1
    assert proc.returncode == (1 if change == "world_size" else 2) and expected in proc.stderr, proc.stderr[-2000:]
    assert "--overwrite_output_dir" in proc.stderr or "--universal_checkpoint" in proc.stderr


def test_universal_checkpoint_resumes_on_another_number_of_ranks(tiny_llama, tmp_path):
    out = tmp_path / "run"
    run_cli("train_rm.py", *rm_args(tiny_llama, out), nproc=2, launcher="torchrun", env={"RLHF_DS_DIE_AT": "step:5"})
    assert latest_checkpoint(out).name == "step-4"
    proc = check_ok(run_cli("train_rm.py", *rm_args(tiny_llama, out, "--universal_checkpoint")))
    assert "resuming from" in proc.stdout and (out / "value_head.json").exists()
    assert [r["step"] for r in train_rows(out)] == list(range(1, 9))
