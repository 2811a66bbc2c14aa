"""The output folder belongs to the run that holds its lock, and only what rlhf_ds wrote is ever removed from it;
checkpoints are pruned and found without losing what `latest` names; run logs survive a torn last line."""
import json
import os
import time

import pytest

from rlhf_ds import outputs
from rlhf_ds.checkpoint import LATEST, MANIFEST, STATE_FILE, complete_checkpoints, latest_checkpoint, prune
from rlhf_ds.errors import UserError


def test_overwrite_never_empties_a_folder_rlhf_ds_did_not_make(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "results.json").write_text("{}")
    lock, foreign = outputs.claim(mine, "SFT")
    assert foreign and not (mine / outputs.MARKER).exists()  # never marked as rlhf_ds's
    with pytest.raises(UserError, match="held files rlhf_ds did not write"):
        outputs.start_fresh(mine, overwrite=True, finished_marker="train_results.json", foreign=foreign)
    lock.release()
    assert sorted(p.name for p in mine.iterdir() if p.name != outputs.LOCK) == ["results.json", "thesis.tex"]


def test_overwrite_clears_only_what_rlhf_ds_wrote_in_its_own_folder(tmp_path):
    out = tmp_path / "run"
    lock, foreign = outputs.claim(out, "SFT")
    assert not foreign and (out / outputs.MARKER).is_file()
    for name in ("metrics.jsonl", "train_results.json", "adapter_model.safetensors", "user_notes.txt"):
        (out / name).write_text("x")
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    outputs.start_fresh(out, overwrite=True, finished_marker="train_results.json", foreign=False)
    lock.release()
    assert sorted(p.name for p in out.iterdir()) == sorted([outputs.LOCK, outputs.MARKER, "user_notes.txt"])


def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_holder(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    lock, _ = outputs.claim(out, "RM")
    code = (f"from pathlib import Path; from rlhf_ds.outputs import claim\n"
            f"claim(Path({str(out)!r}), 'RM')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "is in use by another run (host" in proc.stderr and f"pid {os.getpid()}" in \
        proc.stderr
    lock.release()  # the holder ends: the folder is free again
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_requeued_job_is_recognised(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock, _ = outputs.claim(out, "PPO")
    lock.release()
    assert outputs.is_requeue(out) == "job 4242 started this folder earlier"
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    assert outputs.is_requeue(out) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert "restart 2" in outputs.is_requeue(out)


def fake_checkpoint(root, step, age):
    step_dir = root / f"step-{step}"
    step_dir.mkdir(parents=True)
    (step_dir / STATE_FILE).write_text(json.dumps({"loop": {"step": step}}))
    (step_dir / MANIFEST).write_text("{}")
    os.utime(step_dir / MANIFEST, (time.time() - age, time.time() - age))
    return step_dir


def test_pruning_keeps_what_latest_names_and_drops_an_abandoned_future_first(tmp_path):
    root = tmp_path / "checkpoints"
    # a run saved 2, 4, 6; the user resumed from step-2 and the new run saved step-3
    for step, age in ((2, 400), (4, 300), (6, 200), (3, 10)):
        fake_checkpoint(root, step, age)
    (root / LATEST).write_text("step-3")
    prune(root, keep=2)
    assert sorted(p.name for p in complete_checkpoints(root)) == ["step-3", "step-6"]
    (root / LATEST).write_text("step-2")  # resumed from the oldest: it stays, with the newest
    fake_checkpoint(root, 2, 500)
    prune(root, keep=1)
    assert {p.name for p in complete_checkpoints(root)} == {"step-2", "step-3"}


def test_a_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2, 100)
    fake_checkpoint(root, 4, 50)
    (root / "step-6.tmp").mkdir()
    (root / LATEST).write_text("step-6")  # a pruned or half-written one
    assert latest_checkpoint(tmp_path).name == "step-4"
    assert "names no complete checkpoint" in caplog.text
    (root / "step-8").mkdir()  # a folder without its manifest is not complete
    (root / LATEST).write_text("step-8")
    assert latest_checkpoint(tmp_path).name == "step-4"


def test_a_torn_last_line_in_a_run_log_is_dropped_not_fatal(tmp_path, caplog):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "tra')
    outputs.truncate_run_logs(tmp_path, step=5)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    assert "line 3 is not complete JSON" in caplog.text


def test_export_never_replaces_a_folder_it_did_not_write(tmp_path):
    from rlhf_ds.export import EXPORTED, publish_dir

    dest = tmp_path / "policy"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="was not written by export.py"):
        publish_dir(lambda tmp: (tmp / "config.json").write_text("{}"), dest)
    assert (dest / "precious.txt").read_text() == "keep me"
    fresh = tmp_path / "exported"
    publish_dir(lambda tmp: (tmp / "config.json").write_text("{}"), fresh)
    assert (fresh / EXPORTED).is_file()
    publish_dir(lambda tmp: (tmp / "config.json").write_text('{"v": 2}'), fresh)  # its own export: replaced
    assert json.loads((fresh / "config.json").read_text()) == {"v": 2}
