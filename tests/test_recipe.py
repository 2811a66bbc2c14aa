"""The whole recipe end to end on a tiny model (SFT -> RM -> PPO -> report), then export, reload and chat; and
the shell scripts that mirror the original recipe, under python and the deepspeed launcher."""
import os
import sys

import pytest
import torch

from conftest import REPO, Started, check_ok, child_env, run_cli, run_tree, start_cli


def test_recipe_runs_end_to_end_then_exports_and_reloads(tiny_llama, forked_cli, tmp_path):
    out = tmp_path / "recipe"
    args = ["--model", str(tiny_llama), "--output_dir", str(out), "--sft_examples", "48", "--sft_eval", "8",
            "--rm_pairs", "40", "--rm_eval", "8", "--ppo_steps", "2", "--ppo_eval_prompts", "4", "--max_length", "96",
            "--max_prompt_length", "48", "--max_new_tokens", "8"]
    proc = check_ok(run_cli("run_recipe.py", *args))
    for stage in ("1/3 supervised fine-tuning", "2/3 reward model", "3/3 PPO"):
        assert stage in proc.stdout
    assert "SFT  held-out perplexity" in proc.stdout and "win rate vs reference" in proc.stdout
    lines = proc.stdout.splitlines()
    for stage in ("SFT", "reward model", "PPO"):  # each stage's progress comes through as whole lines
        assert any(line.startswith(f"{stage}: ") and " steps | " in line for line in lines), stage
    report = (out / "report.md").read_text()
    assert "Precision that ran: SFT " in report
    assert "where the better answer is the shorter one" in report and "PPO answers went from " in report
    length_line = report.split("PPO answers went from ")[1].splitlines()[0]
    assert "the reward rose" in length_line or "the reward did not rise" in length_line
    for section in ("## Headline figures", "## Did it work?", "## Curves",
                    "## Answers to the same held-out prompts before and after PPO"):
        assert section in report
    for png in ("sft_loss.png", "rm_training.png", "ppo_training.png", "ppo_eval.png"):
        assert (out / png).stat().st_size > 1000 and f"({png})" in report
    sft_prompts = {r["instruction"] for r in __import__("json").loads((out / "data" / "sft.json").read_text())}
    ppo_prompts = {r["instruction"] for r in __import__("json").loads((out / "data" / "ppo_prompts.json").read_text())}
    assert not sft_prompts & ppo_prompts  # PPO prompts are held out from SFT

    # The RM trains debiased on the pairs without the held-out ones, and is scored on held-out pairs where the better
    # answer is sometimes the shorter one.
    rm_args = __import__("json").loads((out / "rm" / "training_args.json").read_text())
    assert rm_args["length_debias"] == "length_negatives+regress" and rm_args["negatives_share"] == 1.0
    assert rm_args["dataset"] == "comparison_gpt4_zh_train"
    rm_eval = __import__("json").loads((out / "rm" / "eval_results.json").read_text())
    assert rm_eval["eval_samples"] == 8 and rm_eval["eval_chosen_shorter_pairs"] >= 2
    state = __import__("json").loads((out / "recipe.json").read_text())
    assert state["profile"] in ("bf16", "fp32") and all(0.1 < state["peak_memory_gib"][s] < 24 for s in ("sft", "rm",
                                                                                                          "ppo"))
    again = check_ok(run_cli("run_recipe.py", *args))  # finished stages are kept
    assert again.stdout.count("finished earlier") == 3

    merged = tmp_path / "merged"
    check_ok(forked_cli.run("export.py", "--model_dir", str(out / "ppo"), "--output_dir", str(merged)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("你好", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    chat = check_ok(forked_cli.run("chat.py", "--model", str(out / "ppo"), "--prompt", "你好", "--max_new_tokens",
                                   "4"))
    assert chat.stdout.strip()


def test_the_dpo_and_grpo_paths_run_end_to_end_with_their_reports(tiny_llama, tmp_path):
    import json

    grpo = start_cli("run_recipe.py", "--algo", "grpo", "--model", str(tiny_llama), "--output_dir",
                     str(tmp_path / "grpo"), "--grpo_steps", "2", "--grpo_prompts", "2", "--grpo_samples", "2",
                     "--grpo_max_new_tokens", "6", "--grpo_args", "--max_samples 16")  # beside the DPO recipe
    out = tmp_path / "dpo"
    proc = check_ok(run_cli("run_recipe.py", "--algo", "dpo", "--model", str(tiny_llama), "--output_dir", str(out),
                            "--sft_examples", "24", "--sft_eval", "4", "--rm_pairs", "24", "--rm_eval", "8",
                            "--dpo_pairs", "24", "--dpo_eval", "8", "--judge_prompts", "4", "--ppo_eval_prompts", "4",
                            "--max_length", "64", "--max_new_tokens", "6"))
    for stage in ("1/4 supervised fine-tuning", "2/4 reward model", "3/4 DPO", "4/4 the SFT and the DPO answers"):
        assert stage in proc.stdout
    assert "dpo vs sft: win rate" in proc.stdout
    judged = json.loads((out / "judge" / "judge.json").read_text())
    assert judged["prompts"] == 4 and set(judged["policies"]) == {"sft", "dpo"}
    assert 0 <= judged["policies"]["dpo"]["win_rate_vs_first"] <= 1 and len(judged["samples"]) == 4
    report = (out / "report.md").read_text()
    assert "DPO implicit reward: held-out accuracy" in report and "## sft and dpo answers" in report
    assert (out / "dpo_training.png").is_file() and "(dpo_training.png)" in report

    out = tmp_path / "grpo"
    proc = check_ok(grpo.result())
    assert "1/1 GRPO with the math reward" in proc.stdout and "GRPO held-out accuracy" in proc.stdout
    report = (out / "report.md").read_text()
    assert "held-out accuracy (greedy answers, math reward)" in report and "GRPO answers went from" in report
    trained = json.loads((out / "grpo" / "training_args.json").read_text())  # the profile's bound reached the stage
    assert trained["overlong_buffer"] == json.loads((out / "recipe.json").read_text())["arguments"][
        "grpo_overlong_buffer"]


def test_recipe_shell_scripts_run_under_python_and_the_deepspeed_launcher(tiny_llama, tmp_path):
    quick = "--max_steps 1 --max_samples 24 --max_length 64 --disable_tqdm --save_steps 0"
    base_env = child_env(MODEL=str(tiny_llama), PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                         EXTRA_ARGS=quick)
    runs = [("train_sft.sh", {"OUT": str(tmp_path / "sft")}),
            ("train_rm.sh", {"OUT": str(tmp_path / "rm"), "LAUNCHER": "deepspeed --num_gpus 2"}),
            ("train_ppo.sh", {"OUT": str(tmp_path / "ppo"), "SFT": str(tmp_path / "sft"), "RM": str(tmp_path / "rm"),
                              "EXTRA_ARGS": quick.replace("--max_length 64", "--max_new_tokens 4 --max_prompt_length 32")})]
    started = [Started(["bash", str(REPO / "launch" / "recipe" / script)], 300, env={**base_env, **env})
               for script, env in runs[:2]]  # SFT and RM at once: neither needs the other
    for run in started:
        check_ok(run.result())
    script, env = runs[2]
    check_ok(run_tree(["bash", str(REPO / "launch" / "recipe" / script)], timeout=300, env={**base_env, **env}))
    assert (tmp_path / "sft" / "adapter_config.json").exists() and (tmp_path / "rm" / "value_head.json").exists()
    assert (tmp_path / "ppo" / "actor_merged" / "config.json").exists()


def test_the_recipe_is_sized_by_the_precision_its_stages_will_run_in(monkeypatch):
    from rlhf_ds.engines import precision
    from rlhf_ds.recipe import PROFILES, RecipeArguments

    for forced, profile in (("native", "bf16"), ("absent", "fp32")):
        monkeypatch.setenv(precision.FORCE_ENV, forced)
        precision.probe_cpu_bf16.cache_clear()
        args = RecipeArguments()
        assert args.profile == profile and args.ppo_epochs == PROFILES[args.model][profile]["ppo_epochs"]
        assert args.sft_examples == PROFILES[args.model][profile]["sft_examples"]
    assert RecipeArguments(precision="fp32", sft_examples=7).sft_examples == 7  # a flag wins over the profile
    precision.probe_cpu_bf16.cache_clear()


def test_the_grpo_path_bounds_the_answers_where_that_was_measured(tmp_path):
    from rlhf_ds.errors import UserError
    from rlhf_ds.recipe import RecipeArguments, stage_commands

    def grpo_flags(args):
        flags = stage_commands(args, tmp_path, None, None)["grpo"]
        return flags[flags.index("--max_new_tokens") + 1], (
            flags[flags.index("--overlong_buffer") + 1] if "--overlong_buffer" in flags else None)

    bf16 = RecipeArguments(algo="grpo", precision="bf16")
    assert (bf16.grpo_max_new_tokens, bf16.grpo_overlong_buffer) == (40, 14) and grpo_flags(bf16) == ("40", "14")
    fp32 = RecipeArguments(algo="grpo", precision="fp32")  # not measured there: unbounded, as before
    assert grpo_flags(fp32) == ("32", None)
    assert RecipeArguments(algo="grpo", precision="bf16", grpo_max_new_tokens=6).grpo_overlong_buffer == 2  # same share
    assert RecipeArguments(algo="grpo", precision="bf16", grpo_overlong_buffer=0).grpo_overlong_buffer == 0
    with pytest.raises(UserError, match="--grpo_overlong_buffer 40 must be in"):
        RecipeArguments(algo="grpo", precision="bf16", grpo_overlong_buffer=40)
