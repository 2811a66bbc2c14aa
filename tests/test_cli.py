"""The command line every stage shares: launcher flags written after the script get one line with the right order,
flags a stage cannot use are refused instead of ignored, and the `rlhf-ds` console script runs every stage."""
import subprocess
import sys

from conftest import REPO
from rlhf_ds.cli import COMMANDS, misplaced_launcher_flags


def test_launcher_flags_after_the_script_are_shown_in_the_right_order():
    line = misplaced_launcher_flags(["--num_gpus", "2", "--do_train", "--dataset", "x"], "launch/train_ppo.py")
    assert line.endswith("deepspeed --num_gpus 2 launch/train_ppo.py --do_train --dataset x")
    line = misplaced_launcher_flags(["--nproc_per_node=2", "--do_train"], "launch/train_rm.py")
    assert "torchrun --nproc_per_node=2 launch/train_rm.py --do_train" in line
    assert misplaced_launcher_flags(["--do_train", "--output_dir", "o"], "launch/train_rm.py") is None


def test_the_design_cards_spelling_gets_one_line_for_every_launch_script(forked_cli):
    scripts = ("train_ppo.py", "train_grpo.py", "train_sft.py", "export.py", "chat.py")
    procs = forked_cli.run_many([(script, ["--num_gpus", "2", "--hostfile", "hosts", "--do_train"])
                                 for script in scripts])
    for script, proc in zip(scripts, procs):
        assert proc.returncode == 2, (script, proc.stderr)
        assert f"deepspeed --num_gpus 2 --hostfile hosts launch/{script} --do_train" in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (script, proc.stderr)


REFUSED_FLAGS = [
    ("train_ppo.py", ["--max_length", "128"], "--max_length is not used here: the online trainers use"),
    ("train_ppo.py", ["--gradient_checkpointing"], "--actor_gradient_checkpointing"),
    ("train_sft.py", ["--keep_ties"], "--keep_ties is not used here"),
    ("eval_rm.py", ["--val_size", "0.1"], "--val_size is not used here"),
    ("train_grpo.py", ["--vf_coef", "0.5", "--reward_fn", "math"], "--vf_coef is not used by this run: "
                                                                    "--advantage_estimator grpo builds no critic"),
    ("train_grpo.py", ["--ref_zero_stage", "3", "--reward_fn", "math"], "the KL coefficient is 0"),
]


def test_flags_a_stage_cannot_use_are_refused(tiny_llama, forked_cli, tmp_path):
    runs = []
    for i, (script, args, _) in enumerate(REFUSED_FLAGS):
        base = ["--model_name_or_path", str(tiny_llama), "--do_train", "--dataset", "gsm8k_test", "--max_samples",
                "16", "--output_dir", str(tmp_path / f"out{i}")] if script != "eval_rm.py" else \
            ["--reward_model", str(tmp_path), "--dataset", "comparison_gpt4_en"]
        runs.append((script, base + args))
    for (script, args, message), proc in zip(REFUSED_FLAGS, forked_cli.run_many(runs)):
        assert proc.returncode == 2 and message in proc.stderr, (script, args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (script, args)


def test_the_console_script_lists_every_command_and_runs_one(capsys):
    from rlhf_ds.cli import main

    main(["--help"])
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    proc = subprocess.run([sys.executable, "-m", "rlhf_ds.cli", "train-ppo", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "--advantage_estimator" in proc.stdout and "--sft_model" in proc.stdout
    for name, (_, script, _) in COMMANDS.items():
        if script:
            assert f'run_command("{name}")' in (REPO / "launch" / script).read_text()
