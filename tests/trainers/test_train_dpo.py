"""DPO and its family through launch/train_dpo.py: chosen and rejected in one forward on the answer tokens only
(left or right padding alike), the reference computed once or every step with the same result, learning, the
implicit-reward accuracy beside the length baseline, eval_rm.py scoring with a DPO output, 2 processes under ZeRO-3
with LoRA and with full fine-tuning, export and resume."""
import json

import pytest
import torch

from conftest import check_ok, read_jsonl, run_cli, start_cli
from test_resume import assert_same_run

STEP_KEYS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps",
             "rejected_logps", "chosen_length", "rejected_length", "learning_rate")


def dpo_args(model, out, *extra):
    return ["--model_name_or_path", str(model), "--do_train", "--dataset", "comparison_gpt4_en", "--max_samples",
            "120", "--output_dir", str(out), "--max_length", "96", "--per_device_train_batch_size", "4",
            "--disable_tqdm", "--save_steps", "0", "--logging_steps", "1", *extra]


def test_answer_log_probs_are_the_same_under_left_and_right_padding(tiny_llama):
    from transformers import AutoModelForCausalLM

    from rlhf_ds.data.collate import PreferenceCollator
    from rlhf_ds.trainers.dpo import answer_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    rows = [{"chosen_ids": [5, 6, 7, 8, 9, 10], "rejected_ids": [5, 6, 7, 11], "chosen_prompt_len": 3,
             "rejected_prompt_len": 3},
            {"chosen_ids": [20, 21, 22, 23], "rejected_ids": [20, 21, 24, 25, 26, 27, 28], "chosen_prompt_len": 2,
             "rejected_prompt_len": 2}]
    results = {}
    for side in ("left", "right"):
        batch = PreferenceCollator(0, side)(rows)
        with torch.no_grad():
            results[side] = answer_logprobs(model, batch)
    torch.testing.assert_close(results["left"][0], results["right"][0], atol=1e-5, rtol=0)
    assert results["left"][1].tolist() == [3, 2, 1, 5]  # answer tokens only: chosen rows, then rejected rows
    # one row by hand: the log-probability of tokens 8, 9, 10 after 5, 6, 7
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits[0], -1)
    want = sum(logp[t - 1, tok].item() for t, tok in ((3, 8), (4, 9), (5, 10)))
    assert results["left"][0][0].item() == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_a_shared_prompt_gives_the_same_log_probs_as_separate_rows(tiny_llama, tiny_gpt2, tokenizer_dir, tmp_path,
                                                                   arch):
    """Packing [prompt | chosen | rejected] into one row (the prompt computed once) must not change a number: under
    SDPA and eager attention, left and right padding, prompts and answers of different lengths."""
    from transformers import AutoModelForCausalLM

    from rlhf_ds.data.collate import PreferenceCollator
    from rlhf_ds.models import tiny
    from rlhf_ds.trainers.dpo import answer_logprobs

    path = {"llama": tiny_llama, "gpt2": tiny_gpt2}.get(arch) or tiny.make_model(tmp_path / arch, tokenizer_dir, arch)
    g = torch.Generator().manual_seed(0)
    rows = []
    for prompt_len, chosen_len, rejected_len in ((9, 4, 12), (3, 15, 2), (14, 7, 7)):
        prompt = torch.randint(10, 1500, (prompt_len,), generator=g).tolist()
        rows.append({"chosen_ids": prompt + torch.randint(10, 1500, (chosen_len,), generator=g).tolist(),
                     "rejected_ids": prompt + torch.randint(10, 1500, (rejected_len,), generator=g).tolist(),
                     "chosen_prompt_len": prompt_len, "rejected_prompt_len": prompt_len})
    for attention in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).eval()
        for side in ("left", "right"):
            batch = PreferenceCollator(0, side)(rows)
            with torch.no_grad():
                separate = answer_logprobs(model, batch, share_prompt=False)
                shared = answer_logprobs(model, batch, share_prompt=True)
            torch.testing.assert_close(shared[0], separate[0], atol=1e-4, rtol=0)
            assert shared[1].tolist() == separate[1].tolist() == [4, 15, 7, 12, 2, 7]


def test_dpo_learns_reports_the_length_baseline_and_scores_pairs_in_eval_rm(tiny_llama, forked_cli, tmp_path):
    out = tmp_path / "dpo"
    proc = check_ok(forked_cli.run("train_dpo.py", *dpo_args(
        tiny_llama, out, "--finetuning_type", "lora", "--lora_target", "q_proj,v_proj,down_proj,lm_head",
        "--learning_rate", "5e-3", "--num_train_epochs", "2", "--do_eval", "--val_size", "24", "--beta", "0.5")))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert all(all(k in r for k in STEP_KEYS) for r in rows)
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    late = rows[-5:]
    assert sum(r["reward_accuracy"] for r in late) / 5 > 0.7 and sum(r["loss"] for r in late) / 5 < rows[0]["loss"]
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_accuracy", "eval_length_baseline_accuracy", "eval_samples", "eval_chosen_shorter_pairs",
            "eval_score_length_correlation"} <= set(results)
    assert ("eval_length_balanced_accuracy" in results) == (results["eval_chosen_shorter_pairs"] > 0)
    assert "implicit-reward accuracy" in proc.stdout + proc.stderr and "length-only baseline" in proc.stdout + proc.stderr
    meta = json.loads((out / "dpo.json").read_text())
    assert meta["loss_type"] == "sigmoid" and meta["beta"] == 0.5
    scored = tmp_path / "scored.json"
    check_ok(forked_cli.run("eval_rm.py", "--reward_model", str(out), "--dataset", "comparison_gpt4_en",
                            "--max_samples", "120", "--max_length", "96", "--output_file", str(scored)))
    assert 0.5 < json.loads(scored.read_text())["eval_accuracy"] <= 1  # the implicit reward ranks held-in pairs
    check_ok(forked_cli.run("export.py", "--model_dir", str(out), "--output_dir", str(tmp_path / "merged")))
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("loss", ["simpo", "orpo", "ipo"])
def test_the_other_losses_run_and_the_reference_free_ones_build_no_reference(tiny_llama, forked_cli, tmp_path, loss):
    out = tmp_path / loss
    proc = check_ok(forked_cli.run("train_dpo.py", *dpo_args(tiny_llama, out, "--finetuning_type", "full",
                                                             "--loss_type", loss, "--max_steps", "2")))
    assert ("reference ZeRO" in proc.stdout) == (loss == "ipo")  # full fine-tuning: a frozen copy for ipo only
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)


def test_precomputed_and_per_step_references_train_alike_on_two_processes_under_zero3(tiny_llama, tmp_path):
    """Also the packed path end to end (--share_prompt on): policy, precomputing pass and per-step reference."""
    runs, started = {}, []
    for mode in ("--precompute_ref_logps", "--no_precompute_ref_logps"):  # both at once
        out = tmp_path / mode.strip("-")
        started.append(start_cli("train_dpo.py", *dpo_args(
            tiny_llama, out, "--finetuning_type", "lora", "--lora_target", "q_proj,v_proj", "--zero_stage", "3",
            "--stage3_param_persistence_threshold", "0", "--max_steps", "3", "--learning_rate", "1e-3", mode,
            "--share_prompt", "on"), nproc=2, launcher="torchrun"))
        runs[mode] = out
    for run in started:
        check_ok(run.result())
    assert_same_run(runs["--precompute_ref_logps"], runs["--no_precompute_ref_logps"],
                    ("loss", "reward_margin", "chosen_logps"), ["adapter_model.safetensors"])


def test_full_fine_tuning_on_two_processes_resumes_exactly_after_a_kill(tiny_llama, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ("--finetuning_type", "full", "--zero_stage", "3", "--stage3_param_persistence_threshold", "0",
            "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-4")
    uninterrupted = start_cli("train_dpo.py", *dpo_args(tiny_llama, straight, *args), nproc=2, launcher="torchrun")
    proc = run_cli("train_dpo.py", *dpo_args(tiny_llama, killed, *args), nproc=2, launcher="torchrun",
                   env={"RLHF_DS_DIE_AT": "step:3"})
    check_ok(uninterrupted.result())
    assert proc.returncode != 0
    again = check_ok(run_cli("train_dpo.py", *dpo_args(tiny_llama, killed, *args), nproc=2, launcher="torchrun"))
    assert "resuming from" in again.stdout
    assert_same_run(straight, killed, ("loss", "reward_margin", "chosen_logps"), ["model.safetensors"])
