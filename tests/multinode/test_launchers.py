"""Multi-node launch paths, for real on one machine: torchrun with two node ranks on loopback; and, on a two-host
cluster made of network namespaces (tests/multinode/cluster.sh: own addresses and hostnames, sshd, munge, slurmctld,
a slurmd per host), the preflight, `deepspeed --hostfile` over pdsh/ssh, `deepspeed --launcher openmpi`, and a
launch/slurm job script with its preemption signal, requeue and resumption. A rank that dies or hangs makes the
others stop within --dist_timeout, naming it.

The cluster tests need root, `ip netns` and Debian's slurmd slurmctld slurm-client munge openssh-server pdsh
(.ci/run installs them); without them they are skipped with the reason."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, Started, read_jsonl
from rlhf_ds.dist import free_port

VENV_BIN = Path(sys.executable).parent
CLUSTER = Path(__file__).with_name("cluster.sh")
ENV = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}
for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
    ENV.pop(key, None)


def rm_flags(model, out, steps=4, *extra):
    return ["--model_name_or_path", str(model), "--do_train", "--dataset", "comparison_gpt4_en", "--max_samples", "96",
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", str(steps),
            "--save_steps", "1000", "--logging_steps", "1", "--max_length", "96", "--disable_tqdm",
            "--finetuning_type", "lora", *extra]


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def two_torchrun_nodes(model, out, steps, *extra):
    """Two torchrun agents, node ranks 0 and 1, one rank each, meeting on 127.0.0.1 (static rendezvous)."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [str(VENV_BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(REPO / "launch" / "train_rm.py"),
               *rm_flags(model, out, steps, *extra)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                                      cwd=REPO, start_new_session=True))
    return procs


def finish(procs, timeout=240) -> list[str]:
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return outputs


def test_torchrun_with_two_node_ranks_on_loopback(tiny_llama, tmp_path):
    out = tmp_path / "rm"
    procs = two_torchrun_nodes(tiny_llama, out, 4)
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "2 rank(s)" in outputs[0] and train_steps(out) == [1, 2, 3, 4]
    assert (out / "value_head.json").exists()


def rank_pid(out: Path, rank: int) -> int:
    for line in subprocess.run(["pgrep", "-f", f"train_rm.py.*{out}"], capture_output=True, text=True).stdout.split():
        pid = int(line)
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"torchrun" not in cmdline:
            return pid
    raise AssertionError(f"no process for rank {rank}")


def test_a_lost_rank_is_named_and_the_others_stop_within_the_timeout(tiny_llama, tmp_path):
    """Rank 1 is SIGKILLed (its socket closes) in one run and SIGSTOPped (it hangs) in another, the two runs going at
    once: each rank 0, on another node's launcher that knows nothing of its rank 1, must stop by itself within
    --dist_timeout (plus the diagnosis), naming rank 1."""
    timeout = 15
    hows = {"killed": signal.SIGKILL, "hung": signal.SIGSTOP}
    outs = {how: tmp_path / how for how in hows}
    procs = {how: two_torchrun_nodes(tiny_llama, outs[how], 400, "--dist_timeout", str(timeout)) for how in hows}
    victims, output0, took = {}, {}, {}
    try:
        for how in hows:
            wait_for(lambda: (outs[how] / "metrics.jsonl").exists() and len(train_steps(outs[how])) >= 3, 240,
                     f"step 3 ({how})")
            victims[how] = rank_pid(outs[how], 1)
        started = time.time()
        for how, sig in hows.items():
            os.kill(victims[how], sig)
        for how in hows:
            output0[how] = procs[how][0].communicate(timeout=timeout + 60)[0]
            took[how] = time.time() - started
    finally:
        # torchrun put the hung worker in its own process group: kill it by pid
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(victims["hung"], signal.SIGKILL)
        for pair in procs.values():
            finish(pair, timeout=30)
    for how in hows:
        assert procs[how][0].returncode != 0, how
        message = [line for line in output0[how].splitlines() if line.startswith("error: rank 0: lost rank 1")]
        assert message, how + "\n" + output0[how][-3000:]
        assert f"pid {victims[how]}" in message[0], how
        assert took[how] < timeout + 30, (how, took)  # the timeout, plus a few seconds to find which rank stopped


# ---------------------------------------------------------------------------------------------- the two-host cluster

def cluster_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("slurmctld", "slurmd", "munged", "sshd", "pdsh", "nsenter", "ip"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            return f"{tool} is not installed (apt-get install slurmd slurmctld slurm-client munge openssh-server pdsh)"
    probe = subprocess.run(["ip", "netns", "add", "rlhf-probe"], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", "rlhf-probe"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = cluster_missing()
    if reason:
        if os.environ.get("RLHF_DS_REQUIRE_CLUSTER") == "1" and os.geteuid() == 0 and shutil.which("apt-get"):
            pytest.fail(f"two-host cluster: {reason}, on a machine with root and apt-get where .ci/run requires the "
                        f"cluster tests (RLHF_DS_REQUIRE_CLUSTER=1)")
        pytest.skip(f"two-host cluster: {reason}")
    work = Path("/tmp") / f"rlhf-cluster-{os.getpid()}"  # short: unix socket paths live under it
    up = subprocess.run(["bash", str(CLUSTER), "up", str(work)], capture_output=True, text=True, timeout=180)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        env = {**ENV, "SLURM_CONF": str(work / "slurm" / "slurm.conf"),
               "PDSH_SSH_ARGS_APPEND": f"-F {work / 'ssh' / 'config'}",
               "PRTE_MCA_plm_ssh_args": f"-F {work / 'ssh' / 'config'}",  # Open MPI 5 (PRRTE) starts daemons by ssh
               "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        # what the ranks on every host need: DeepSpeed forwards only PYTHON*/MLFLOW*/UCX* variables by itself
        ds_env = work / "deepspeed_env"
        # (TORCH_EXTENSIONS_DIR too: without it each rank would build DeepSpeed's op again under ~/.cache, once per
        # clone, 25-140 s with the ranks of both launchers waiting on one lock, instead of loading the suite's build)
        ds_env.write_text(f"PATH={env['PATH']}\nHF_HUB_OFFLINE=1\nHF_DATASETS_OFFLINE=1\n"
                          f"TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}\n")
        env["DS_ENV_FILE"] = str(ds_env)
        hostfile = work / "hostfile"
        hostfile.write_text("# two hosts, one rank each\nhost1 slots=1\nhost2 slots=1\n")
        yield {"work": work, "env": env, "hostfile": hostfile, "ssh_config": work / "ssh" / "config"}
    finally:
        subprocess.run(["bash", str(CLUSTER), "down", str(work)], capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def on_host1(*cmd: str) -> list[str]:
    """Run a command as if logged in on host1: its network namespace and its hostname."""
    return ["nsenter", "--net=/run/netns/rlhf-h1", "unshare", "--uts", "sh", "-c", 'hostname host1; exec "$@"', "x",
            *cmd]


def start(cmd, env, timeout=300) -> Started:
    return Started(cmd, timeout, env=env, cwd=REPO)


def result(started: Started) -> subprocess.CompletedProcess:
    proc = started.result()
    proc.seconds = time.time() - (started.deadline - started.timeout)
    print(f"{' '.join(started.cmd[:12])} ... -> {proc.returncode} in {proc.seconds:.1f} s")
    return proc


def run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    return result(start(cmd, env, timeout))


def test_preflight_passes_on_good_hosts_and_names_the_host_and_fix_otherwise(cluster, tmp_path):
    py = str(VENV_BIN / "python")
    down_hosts, bad_syntax = tmp_path / "down-hostfile", tmp_path / "bad-hostfile"
    down_hosts.write_text("host1 slots=1\nhost3 slots=1\n")  # host3 does not exist
    bad_syntax.write_text("host1 slots=1\nhost2 slots=one\n")
    # the three checks over ssh wait mostly on the network and the other host: started together
    # (each with its own master port: the preflight checks that the port is free on the master host)
    good, down, unshared = (start(on_host1(py, "-m", "rlhf_ds.preflight", *args, "--ssh_config",
                                           str(cluster["ssh_config"]), "--master_port", str(free_port())),
                                  cluster["env"]) for args in (
        ["--hostfile", str(cluster["hostfile"]), "--output_dir", str(tmp_path / "out")],
        ["--hostfile", str(down_hosts)],
        ["--hostfile", str(cluster["hostfile"]), "--master_addr", "nowhere.invalid"]))
    good, down, unshared = result(good), result(down), result(unshared)

    assert good.returncode == 0, good.stdout + good.stderr
    rows = {line.split()[0]: line for line in good.stdout.splitlines()[1:3]}
    assert set(rows) == {"host1", "host2"} and all(" ok " in r and r.rstrip().endswith("ok") for r in rows.values())
    assert "2 host(s) ready" in good.stdout

    assert down.returncode == 1 and "preflight: host3: not reachable by ssh" in down.stderr, down.stderr
    assert "Fix: passwordless ssh to host3" in down.stderr and "host1" not in down.stderr

    assert unshared.returncode == 1 and "master nowhere.invalid" in unshared.stderr and "unresolved" in unshared.stderr

    syntax = run([py, "-m", "rlhf_ds.preflight", "--hostfile", str(bad_syntax)], cluster["env"])
    assert syntax.returncode == 2 and f"{bad_syntax} line 2: 'host2 slots=one'" in syntax.stderr


def test_deepspeed_hostfile_runs_over_two_hosts_by_pdsh_and_by_openmpi(cluster, tiny_llama, tmp_path):
    """The same 4-step run through each multi-node launcher, the two started together."""
    started = {}
    for launcher in ("pdsh", "openmpi"):
        extra = ["--launcher", "openmpi"] if launcher == "openmpi" else []
        started[launcher] = start(on_host1(
            str(VENV_BIN / "deepspeed"), *extra, "--hostfile", str(cluster["hostfile"]), "--no_ssh_check",
            "--master_addr", "host1", "--master_port", str(free_port()), str(REPO / "launch" / "train_rm.py"),
            *rm_flags(tiny_llama, tmp_path / launcher)), cluster["env"])
    done = {launcher: result(running) for launcher, running in started.items()}
    for launcher, proc in done.items():
        assert proc.returncode == 0, launcher + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "2 rank(s)" in proc.stdout and train_steps(tmp_path / launcher) == [1, 2, 3, 4], launcher
    # pdsh prefixes each line with the host it came from: both hosts ran a rank
    assert re.search(r"^host2: ", done["pdsh"].stdout, re.M)
    assert re.search(r"^host1: \[rlhf_ds\] step 4/4", done["pdsh"].stdout, re.M)


def job_state(job: str, env) -> str:
    line = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env).stdout
    found = re.search(r"JobState=(\w+)", line)
    return found.group(1) if found else "GONE"


def nodes_idle(env) -> bool:
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=env).stdout.split()
    return bool(states) and all(s == "idle" for s in states)


def test_slurm_job_script_on_two_nodes_with_preemption_requeue_and_resume(cluster, tiny_llama, tmp_path):
    """sbatch launch/slurm/train_rm.sbatch on 2 nodes: preflight, training; `scancel --signal=USR1` (what
    --signal=USR1@300 sends before the time limit) makes every rank save and exit 75; the job requeues itself and the
    second run resumes from the checkpoint and finishes."""
    env = cluster["env"]
    out, logs = tmp_path / "rm", tmp_path / "logs"
    logs.mkdir()
    submitted = time.time()
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=00:15:00",
         f"--output={logs}/%x-%j.out", str(REPO / "launch" / "slurm" / "train_rm.sbatch"),
         *rm_flags(tiny_llama, out, 30)], capture_output=True, text=True, env={**env, "RLHF_DS_ROOT": str(REPO)},
        cwd=tmp_path, check=True).stdout.strip()
    log = logs / f"rlhf-rm-{job}.out"
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() and len(train_steps(out)) >= 1, 300, "the first step")
        print(f"SLURM: submit to first step {time.time() - submitted:.1f} s")
        wait_for(lambda: len(train_steps(out)) >= 3, 120, "step 3")
        subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
        wait_for(lambda: "requeueing job" in log.read_text(), 120, "the requeue")
        # SLURM holds a requeued job back for about two minutes (its BeginTime); start it as soon as the first run
        # has left both nodes (earlier, its revoked credential makes the new start fail)
        wait_for(lambda: job_state(job, env) == "PENDING", 60, "the job to be pending again")
        wait_for(lambda: nodes_idle(env), 60, "the nodes to be idle")
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
        wait_for(lambda: job_state(job, env) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 300, "the job to end")
    finally:
        if job_state(job, env) not in ("COMPLETED", "FAILED", "CANCELLED", "GONE"):
            subprocess.run(["scancel", job], env=env)
    text = log.read_text()
    ctld = (cluster["work"] / "slurm" / "log" / "slurmctld.log").read_text().splitlines()
    assert job_state(job, env) == "COMPLETED", text[-3000:] + "\n".join(l for l in ctld if f"JobId={job}" in l)
    assert "2 host(s) ready" in text and "host2" in text  # the preflight ran on both nodes
    assert "stopped: SIGUSR1 received: checkpoint saved at step" in text
    assert "(restart 1)" in text and "resuming from" in text and "reward model saved" in text
    assert train_steps(out) == list(range(1, 31))  # nothing lost, nothing repeated
