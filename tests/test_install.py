"""A non-editable install runs a stage: the shipped data and DeepSpeed configs travel inside the wheel, and nothing
is looked up through the repository."""
import subprocess
import sys
import zipfile

from conftest import REPO, check_ok, child_env, read_jsonl


def test_a_built_wheel_carries_data_and_configs_and_runs_a_stage_outside_the_checkout(tiny_llama, tmp_path):
    wheels = tmp_path / "wheels"
    check_ok(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=300))
    (wheel,) = wheels.glob("rlhf_ds-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("rlhf_ds/_shipped/data/dataset_info.json", "rlhf_ds/_shipped/data/gsm8k_test.jsonl",
                    "rlhf_ds/_shipped/ds_configs/zero3.json", "rlhf_ds/cli.py"):
        assert shipped in names, shipped
    assert any(n.endswith("entry_points.txt") for n in names) and any(n.endswith("licenses/LICENSE") for n in names)
    site = tmp_path / "site"
    check_ok(subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                             str(wheel)], capture_output=True, text=True, timeout=300))
    env = child_env(PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import rlhf_ds.args as a; print(a.DEFAULT_DATASET_DIR)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.stdout.strip() == str(site / "rlhf_ds" / "_shipped" / "data")
    out = tmp_path / "sft"
    proc = check_ok(subprocess.run(
        [sys.executable, "-m", "rlhf_ds.cli", "train-sft", "--model_name_or_path", str(tiny_llama), "--do_train",
         "--dataset", "gsm8k_test", "--max_samples", "16", "--output_dir", str(out), "--max_steps", "1",
         "--per_device_train_batch_size", "4", "--max_length", "64", "--disable_tqdm", "--zero_stage", "3"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300))
    assert "ZeRO-3" in proc.stdout and (out / "train_results.json").is_file()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"] == [1]
