"""What an operator of a shared cluster does to a run, and what must survive it: a requeue with
--overwrite_output_dir, a tampered checkpoint, a second run on the same folder, a full disk on one rank during a
save, a stop signal during set-up and in the middle of a step, and kills at random moments."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


from conftest import REPO, check_ok, copy_run, read_jsonl, run_cli, run_tree, start_cli
from rlhf_ds.checkpoint import MANIFEST, latest_checkpoint
from test_resume import COMPARED, assert_same_run, ppo_args, rm_args


def test_a_requeued_job_with_overwrite_output_dir_resumes_instead_of_deleting_its_checkpoint(tiny_llama, rm_straight,
                                                                                            tmp_path):
    straight, out = rm_straight, tmp_path / "requeued"
    job = {"SLURM_JOB_ID": "777"}
    proc = run_cli("train_rm.py", *rm_args(tiny_llama, out), "--overwrite_output_dir",
                   env={**job, "RLHF_DS_DIE_AT": "step:5"})
    assert proc.returncode == -signal.SIGKILL and latest_checkpoint(out).name == "step-4"
    again = check_ok(run_cli("train_rm.py", *rm_args(tiny_llama, out), "--overwrite_output_dir",
                             env={**job, "SLURM_RESTART_COUNT": "1"}))  # the job script reruns the same command
    assert "--overwrite_output_dir not applied: this job was restarted (restart 1)" in again.stdout
    assert "step 4 of 8" in again.stdout
    assert_same_run(straight, out, COMPARED["rm"], ["adapter_model.safetensors", "value_head.safetensors"])


def test_a_tampered_checkpoint_is_refused_and_runs_no_code(tiny_llama, rm_killed, forked_cli, tmp_path):
    out = copy_run(rm_killed, tmp_path / "run")
    step = latest_checkpoint(out)
    canary = tmp_path / "pwned"

    class Payload:  # unpickling this would run a shell command as the job's owner
        def __reduce__(self):
            return os.system, (f"touch {canary}",)

    rng = step / "rng" / "rank_0.pt"
    rng.write_bytes(pickle.dumps(Payload()))
    proc = forked_cli.run("train_rm.py", *rm_args(tiny_llama, out))
    assert proc.returncode == 2 and "1 file(s) differ from when it was saved (rng/rank_0.pt)" in proc.stderr
    assert not canary.exists() and "Traceback" not in proc.stderr
    # a writer who also rewrites the manifest still cannot run code: nothing is unpickled beyond plain data
    import hashlib

    manifest = json.loads((step / MANIFEST).read_text())
    manifest["sha256"]["rng/rank_0.pt"] = hashlib.sha256(rng.read_bytes()).hexdigest()
    (step / MANIFEST).write_text(json.dumps(manifest))
    proc = forked_cli.run("train_rm.py", *rm_args(tiny_llama, out))
    assert proc.returncode == 2 and "rank_0.pt: holds objects a checkpoint should not" in proc.stderr, \
        proc.stderr[-2000:]
    assert "nothing in it ran" in proc.stderr and not canary.exists() and "Traceback" not in proc.stderr


def test_a_full_disk_on_one_rank_during_a_save_stops_every_rank_and_loses_nothing(tiny_llama, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train_rm.py", *rm_args(tiny_llama, out), nproc=2, launcher="torchrun",
                   env={"RLHF_DS_FAIL_SAVE": "1:4"})
    assert proc.returncode != 0
    assert "checkpoint step-4 was not saved (rank 1 could not write" in proc.stderr and "No space left" in \
        proc.stderr
    assert latest_checkpoint(out).name == "step-2" and not (out / "checkpoints" / "step-4.tmp").exists()
    again = check_ok(run_cli("train_rm.py", *rm_args(tiny_llama, out), nproc=2, launcher="torchrun"))
    assert "step 2 of 8" in again.stdout
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 9))


def test_a_second_run_on_the_same_folder_stops_at_once_naming_the_first(tiny_llama, tmp_path):
    out = tmp_path / "run"
    args = rm_args(tiny_llama, out)
    args[args.index("--max_steps") + 1] = "400"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    first = subprocess.Popen([sys.executable, str(REPO / "launch" / "train_rm.py"), *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        for line in first.stdout:
            if "step 1/400" in line:
                break
        t0 = time.time()
        second = run_cli("train_rm.py", *args)
        assert second.returncode == 2 and "is in use by another run (host" in second.stderr
        assert f"pid {first.pid}" in second.stderr and time.time() - t0 < 30
    finally:
        first.kill()
        first.wait()


def test_a_stop_during_set_up_exits_for_a_requeue_and_one_mid_step_saves_the_last_finished_step(tiny_llama,
                                                                                                  tmp_path):
    out, straight, stopped = tmp_path / "setup", tmp_path / "straight", tmp_path / "stopped"
    in_setup = start_cli("train_ppo.py", *ppo_args(tiny_llama, out), env={"RLHF_DS_SIGNAL_AT": "setup:0"})
    uninterrupted = start_cli("train_ppo.py", *ppo_args(tiny_llama, straight))
    proc = run_cli("train_ppo.py", *ppo_args(tiny_llama, stopped), env={"RLHF_DS_SIGNAL_AT": "rollout:4"})
    check_ok(uninterrupted.result())
    in_setup = in_setup.result()
    assert in_setup.returncode == 75 and "received during set-up, before step 1" in in_setup.stderr
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "SIGUSR1 received during step 4: the step is left undone and step 3 is saved now" in proc.stdout
    assert latest_checkpoint(stopped).name == "step-3"
    check_ok(run_cli("train_ppo.py", *ppo_args(tiny_llama, stopped)))
    assert_same_run(straight, stopped, COMPARED["ppo"], ["actor/adapter_model.safetensors"])


def test_a_run_killed_at_a_random_moment_ends_as_an_uninterrupted_one():
    proc = run_tree([sys.executable, str(REPO / "benchmarks" / "random_kills.py"), "--trials", "1", "--seed", "3"],
                    timeout=600, cwd=REPO)
    check_ok(proc)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["trials"] == 1 and result["kills"] >= 1 and result["trials_that_lost_anything"] == 0, result



def test_a_deepspeed_op_build_lock_left_by_a_killed_start_is_cleared_and_a_live_build_is_waited_for(tmp_path,
                                                                                                   caplog):
    import threading

    from rlhf_ds.engines.ds_compat import guarded_op_build

    build_dir, lock = tmp_path / "op", tmp_path / "op" / "lock"
    seen = []

    def load():
        seen.append(lock.exists())
        return "op"

    assert guarded_op_build(build_dir, load) == "op" and seen == [False]
    lock.touch()  # a start killed inside torch's build 2 minutes ago
    old = time.time() - 120
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING", logger="rlhf_ds"):
        assert guarded_op_build(build_dir, load, grace_s=60) == "op"
    assert seen == [False, False] and f"removed {lock}: a DeepSpeed op build killed 120 s ago" in caplog.text
    lock.touch()  # another program building right now: its lock is waited for, not removed
    threading.Timer(1.5, lock.unlink).start()
    started = time.time()
    guarded_op_build(build_dir, load, grace_s=60)
    assert time.time() - started >= 1.4 and seen == [False, False, False]


def test_a_run_starts_although_a_killed_start_left_deepspeeds_build_lock(tiny_llama, tmp_path):
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"  # where the tests build ops
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    args = rm_args(tiny_llama, tmp_path / "run")
    args[args.index("--max_steps") + 1] = "2"
    proc = check_ok(run_cli("train_rm.py", *args, nproc=2, launcher="torchrun", timeout=300))
    assert re.search(r"removed \S+/lock: a DeepSpeed op build killed 36\d\d s ago had left it", proc.stderr), \
        proc.stderr[-3000:]
    assert not lock.exists()
