"""The reward-model stage end to end through its real CLIs: it learns, runs distributed under ZeRO-3 with LoRA
and offload, reloads with the same scores, and fails with one clear line on bad input."""
import json
import re
from functools import partial
from pathlib import Path

import pytest

from conftest import check_ok, copy_run, read_jsonl, run_cli, write_json, zero3_test_config


def test_reward_model_learns_on_shipped_english_pairs(tiny_llama, forked_cli, tmp_path):
    """The plain Bradley-Terry RM (--length_debias none): on these pairs it learns, and mostly learns length."""
    out = tmp_path / "rm"
    check_ok(forked_cli.run(
        "train_rm.py", "--model_name_or_path", str(tiny_llama), "--do_train", "--do_eval", "--val_size", "0.1",
        "--dataset", "comparison_gpt4_en", "--finetuning_type", "full", "--output_dir", str(out),
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--num_train_epochs", "1",
        "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--max_length", "192", "--plot_loss",
        "--disable_tqdm", "--length_debias", "none"))
    losses = [row["loss"] for row in read_jsonl(out / "metrics.jsonl") if row["kind"] == "train"]
    assert len(losses) == 985 // 8
    start, end = losses[0], sum(losses[-30:]) / 30  # the first step is logged before any update
    assert 0.6 < start < 0.8 and end < 0.5 * start, (start, end)  # from chance (ln 2 = 0.69) to well below it
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_samples"] == 110
    assert results["eval_accuracy"] >= 0.75, results
    assert 0.85 < results["eval_length_baseline_accuracy"] < 1.0
    meta = json.loads((out / "value_head.json").read_text())
    assert meta["score_mean"] == pytest.approx(results["eval_score_mean"])
    assert meta["score_std"] == pytest.approx(results["eval_score_std"]) and meta["score_std"] > 0
    assert (out / "training_loss.png").stat().st_size > 1000
    for name in ("model.safetensors", "config.json", "value_head.safetensors", "tokenizer.json",
                 "training_args.json", "train_results.json", "eval_predictions.jsonl"):
        assert (out / name).exists(), name


def test_two_process_zero3_lora_offload_then_eval_rm_gives_the_same_scores(tiny_llama, tmp_path):
    out = tmp_path / "rm"
    cfg = zero3_test_config(tmp_path / "zero3.json", offload=True)
    proc = check_ok(run_cli(
        "train_rm.py", "--model_name_or_path", str(tiny_llama), "--do_train", "--do_eval", "--val_size", "24",
        "--dataset", "comparison_gpt4_zh", "--max_samples", "120", "--finetuning_type", "lora",
        "--lora_target", "q_proj,v_proj", "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--max_length", "128", "--deepspeed", str(cfg), "--disable_tqdm",
        nproc=2, launcher="deepspeed"))
    assert "ZeRO-3" in proc.stdout and "2 rank(s)" in proc.stdout
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoints" / "step-2" / "model" / "value_head.json").exists()
    train_rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]

    # Re-score the held-out pairs with launch/eval_rm.py (2 ranks, ZeRO-3 inference) from the saved folder.
    held_out = read_jsonl(out / "eval_predictions.jsonl")
    pairs = tmp_path / "held_out.jsonl"
    pairs.write_text("\n".join(json.dumps({"instruction": r["prompt"][-1]["content"], "chosen": r["chosen"],
                                           "rejected": r["rejected"]}, ensure_ascii=False) for r in held_out))
    preds = tmp_path / "preds.jsonl"
    check_ok(run_cli("eval_rm.py", "--reward_model", str(out), "--dataset", str(pairs), "--zero_stage", "3",
                     "--predictions_file", str(preds), "--output_file", str(tmp_path / "eval.json"),
                     "--per_device_eval_batch_size", "5", nproc=2, launcher="deepspeed"))
    again = read_jsonl(preds)
    assert len(again) == len(held_out) == 24
    for before, after in zip(held_out, again):
        assert after["chosen_score"] == pytest.approx(before["chosen_score"], abs=1e-4)
        assert after["rejected_score"] == pytest.approx(before["rejected_score"], abs=1e-4)
    trained = json.loads((out / "eval_results.json").read_text())
    rescored = json.loads((tmp_path / "eval.json").read_text())
    assert rescored["eval_accuracy"] == trained["eval_accuracy"]
    assert rescored["eval_length_baseline_accuracy"] == trained["eval_length_baseline_accuracy"]


def test_torchrun_and_plain_python_run_the_same_stage_in_the_precision_the_processor_runs_fast(tiny_gpt2, tmp_path):
    # --fp16 on a CPU: bf16 where the processor has native bf16 kernels, fp32 where it has none. The probe's answer
    # is forced both ways (RLHF_DS_CPU_BF16), so both branches run whatever processor the tests are on. 16 pairs: two
    # steps on two ranks, and few to score at the save, where bf16 on a processor without bf16 kernels is slow.
    for launcher, nproc, cpu_bf16, expected in (("torchrun", 2, "absent", "fp32"), ("python", 1, "native", "bf16")):
        out = tmp_path / launcher
        proc = check_ok(run_cli(
            "train_rm.py", "--model_name_or_path", str(tiny_gpt2), "--do_train", "--dataset", "comparison_gpt4_en",
            "--max_samples", "16", "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps",
            "2", "--zero_stage", "2", "--fp16", "--disable_tqdm", nproc=nproc, launcher=launcher,
            env={"RLHF_DS_CPU_BF16": cpu_bf16}))
        assert f"{nproc} rank(s)" in proc.stdout
        assert f"precision {expected} (asked: --fp16;" in proc.stdout  # the start-up line
        assert f"ZeRO-2, {expected}, {nproc} rank(s)" in proc.stdout  # what the engine was built with
        assert json.loads((out / "training_args.json").read_text())["precision"] == expected
        starts = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "run"]
        assert [r["precision"] for r in starts] == [expected] and starts[0]["precision_requested"] == "--fp16"
        assert json.loads((out / "value_head.json").read_text())["precision"] == expected


@pytest.mark.parametrize("case", ["bad_json", "bad_record", "too_few", "unknown_dataset", "unknown_flag"])
def test_bad_input_is_one_clear_line_and_nothing_is_left_that_looks_finished(tiny_llama, forked_cli, tmp_path, case):
    out = tmp_path / "out"
    data = tmp_path / "pairs.json"
    write_json(data, [{"instruction": "q", "input": "", "output": ["good", "bad"]}] * 6)
    args = ["--model_name_or_path", str(tiny_llama), "--do_train", "--dataset", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--disable_tqdm"]
    expected = {
        "bad_json": "line 1, column",
        "bad_record": "record 3: key 'output' has 1 answer(s)",
        "too_few": "too few for one optimizer step",
        "unknown_dataset": "registered names are",
        "unknown_flag": "unknown argument(s): --learning_rat",
    }[case]
    if case == "bad_json":
        data.write_text('[{"instruction": "q" "output": ["a", "b"]}]')
    elif case == "bad_record":
        write_json(data, [{"instruction": "q", "input": "", "output": ["a", "b"]}] * 2 +
                   [{"instruction": "q", "input": "", "output": ["a"]}])
    elif case == "too_few":  # 6 pairs and as many padded ones (--length_debias's default) against 16 a step
        args += ["--gradient_accumulation_steps", "8"]
    elif case == "unknown_dataset":
        args[args.index(str(data))] = "comparison_gpt3_zh"
    else:
        args += ["--learning_rat", "1e-4"]
    proc = forked_cli.run("train_rm.py", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (out / "value_head.json").exists()


def test_refuses_to_overwrite_a_finished_run(tiny_llama, rm_straight, forked_cli, tmp_path):
    from test_resume import rm_args

    out = copy_run(rm_straight, tmp_path / "out")
    args = rm_args(tiny_llama, out)
    args[args.index("--max_steps") + 1] = "1"
    proc = forked_cli.run("train_rm.py", *args)
    assert proc.returncode == 2 and "--overwrite_output_dir" in proc.stderr
    check_ok(forked_cli.run("train_rm.py", *args, "--overwrite_output_dir"))


@pytest.mark.parametrize("mode", ["odin", "balanced", "length_negatives+regress", "length_negatives"])
def test_each_length_debias_method_trains_and_its_saved_scores_are_read_as_training_read_them(tiny_llama, forked_cli,
                                                                                          tmp_path, mode):
    """Every --length_debias method trains and reports the length-controlled figures; eval_rm on the saved model
    gives the same figures on the same pairs (so PPO, which loads it the same way, reads the debiased score). ODIN
    runs on 2 processes under ZeRO-3 with every parameter partitioned, where its heads are only whole inside the
    model's forward."""
    from rlhf_ds.args import DEFAULT_DATASET_DIR

    held = json.loads((Path(DEFAULT_DATASET_DIR) / "comparison_gpt4_heldout.json").read_text(encoding="utf-8"))
    held = [r for r in held if r["language"] == "en"]
    shorter = [r for r in held if len(r["output"][0]) < len(r["output"][1])][:12]
    longer = [r for r in held if len(r["output"][0]) > len(r["output"][1])][:12]
    eval_file = write_json(tmp_path / "eval.json", shorter + longer)
    out = tmp_path / mode
    # ODIN on two ranks under torchrun; the others single-process, forked from the suite's warm interpreter
    start = partial(run_cli, nproc=2, launcher="torchrun") if mode == "odin" else forked_cli.run
    extra = ["--deepspeed", str(zero3_test_config(tmp_path / "z3.json", offload=False))] if mode == "odin" else []
    proc = check_ok(start(
        "train_rm.py", "--model_name_or_path", str(tiny_llama), "--do_train", "--do_eval", "--eval_dataset",
        str(eval_file), "--dataset", "comparison_gpt4_en" if mode == "balanced" else "comparison_gpt4_en_train",
        "--max_samples", "64", "--finetuning_type", "lora",
        "--lora_target", "q_proj,v_proj", "--output_dir", str(out), "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3", "--max_length", "96", "--logging_steps", "1", "--disable_tqdm",
        "--save_steps", "0", "--length_debias", mode, *extra))
    log = proc.stdout + proc.stderr
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_chosen_shorter_pairs"] == 12 and results["eval_samples"] == 24
    assert results["eval_length_balanced_accuracy"] == pytest.approx(
        (results["eval_accuracy_chosen_shorter"] + results["eval_accuracy_chosen_longer"]) / 2)
    meta = json.loads((out / "value_head.json").read_text())
    assert meta["length_debias"] == mode
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    if mode == "odin":
        assert all(0 < abs(r["head_cosine"]) < 1 and -1 <= r["quality_length_corr"] <= 1 for r in rows)
        corr = [r["length_head_corr"] for r in rows]
        assert sum(corr[-3:]) > sum(corr[:3]) + 0.3  # the length head learns to follow length
    elif mode == "length_negatives+regress":  # the slope is fitted on the 64 real pairs, not the padded ones
        assert meta["length_slope_per_token"] != 0 and "per answer token on 64 training pairs" in log
        assert 0 <= results["eval_before_regress_accuracy_chosen_shorter"] <= 1  # the same model, uncorrected
    elif mode == "balanced":
        kinds = re.findall(r"(chosen shorter|chosen longer|same length) (\d+) x ([\d.]+)", log)
        assert "chosen shorter" in {k for k, _, _ in kinds}  # each kind weighs the same in total
        assert all(int(n) * float(w) == pytest.approx(64 / len(kinds), rel=0.02) for _, n, w in kinds)
    else:
        made = re.search(r"length_negatives: 64 padded pairs added to 64 training pairs \(made from the (\d+) ", log)
        assert made and int(made.group(1)) > 0
        assert len(rows) == 128 // 4  # none was cut back to its chosen answer by --max_length and dropped
    if "length_negatives" in mode:
        assert "length_negatives: 64 padded pairs added to 64 training pairs" in log
    if mode in ("balanced", "length_negatives"):
        return  # these change the training data, not how a saved model scores
    scored = tmp_path / "scored.json"
    check_ok(forked_cli.run("eval_rm.py", "--reward_model", str(out), "--dataset", str(eval_file), "--max_length",
                            "96", "--output_file", str(scored)))
    again = json.loads(scored.read_text())
    for key in ("eval_accuracy", "eval_accuracy_chosen_shorter", "eval_score_length_correlation"):
        assert again[key] == pytest.approx(results[key], abs=1e-6), key
