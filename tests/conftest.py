"""Fixtures: offline environment, a locally trained tokenizer, tiny models, and a runner for the real CLIs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed's CPU op builds go to a folder of this checkout, not the user's ~/.cache: another clone's build (other
# paths, so a rebuild) or a lock left there by a killed build cannot make the suite wait.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# The environment's own tools first, as an activated venv has them (and as .ci/run runs): DeepSpeed's op build calls
# `ninja` from PATH, and a system ninja of another version beside the venv's would rebuild the op (25 s) each time a
# test's PATH picked the other one.
if os.environ.get("PATH", "").split(os.pathsep)[0] != str(Path(sys.executable).parent):
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

from rlhf_ds.models import tiny  # noqa: E402


def _mapped_anywhere(path: Path) -> bool:
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if str(path) in maps.read_text():
                return True
        except OSError:  # a process that ended meanwhile, or one we may not read
            continue
    return False


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shm_segments():
    """The runs this suite kills with SIGKILL cannot unlink DeepSpeed's shared-memory all-reduce segments (67 MB of
    RAM per rank each). Segments that appeared during the session and that no process maps at its end are the
    suite's own leftovers: removed, so repeated runs do not fill the machine's memory."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    yield
    for segment in set(shm.glob("deepspeed_allreduce_buffer_*")) - before:
        if not _mapped_anywhere(segment):
            segment.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def deepspeed_op_built_early():
    """In a fresh clone the first distributed start builds DeepSpeed's CPU all-reduce op (about 25 s on one core) while
    a test waits for it. Started here in the background, the build runs beside the in-process tests that come first;
    a start that needs the op meanwhile waits on its lock (engines/ds_compat.guarded_op_build). With the op already
    built this only loads it (a few seconds of the other core)."""
    build = subprocess.Popen([sys.executable, "-c", "from rlhf_ds.engines.ds_compat import load_shm_op; load_shm_op()"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    yield
    try:
        build.wait(timeout=300)
    except subprocess.TimeoutExpired:
        build.kill()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def tokenizer_dir(artifacts) -> Path:
    out = artifacts / "tokenizer"
    tiny.train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def plain_tokenizer_dir(artifacts) -> Path:
    out = artifacts / "tokenizer-plain"
    tiny.train_tokenizer(out, chat=False)
    return out


@pytest.fixture(scope="session")
def tiny_llama(artifacts, tokenizer_dir) -> Path:
    return tiny.make_model(artifacts / "tiny-llama", tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(artifacts, tokenizer_dir) -> Path:
    return tiny.make_model(artifacts / "tiny-gpt2", tokenizer_dir, "gpt2")


@pytest.fixture(scope="session")
def dist_env():
    """One-rank torch.distributed in the pytest process, for tests that build DeepSpeed engines in-process."""
    from rlhf_ds import dist

    dist.init_distributed()
    yield


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def zero3_test_config(path: Path, offload: bool = True) -> Path:
    """ZeRO-3 with stage3_param_persistence_threshold 0, so even a tiny model's parameters are partitioned."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return write_json(path, {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "steps_per_print": 10 ** 9, "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto"}},
        "zero_optimization": zero})


class Started:
    """A command started in a session of its own, its output going to files (not pipes, so that several started at
    once never wait on a reader); result() waits like subprocess.run(capture_output=True, text=True) and, on a
    timeout, kills the whole process tree: torchrun and the deepspeed launcher start ranks in sessions of their own,
    which would outlive the launcher and keep the machine busy (or hold DeepSpeed's op build lock) for the rest of
    the suite."""

    def __init__(self, cmd: list[str], timeout: float, **kwargs):
        self.cmd, self.timeout, self.deadline = cmd, timeout, time.time() + timeout
        self.out, self.err = (tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") for _ in range(2))
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, text=True, start_new_session=True,
                                     **kwargs)

    def _read(self) -> tuple[str, str]:
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        return texts[0], texts[1]

    def result(self) -> subprocess.CompletedProcess:
        import psutil

        try:
            self.proc.wait(timeout=max(self.deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            for child in psutil.Process(self.proc.pid).children(recursive=True) + [psutil.Process(self.proc.pid)]:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            self.proc.wait()
            out, err = self._read()
            raise subprocess.TimeoutExpired(self.cmd, self.timeout, output=out, stderr=err) from None
        out, err = self._read()
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, out, err)


def run_tree(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command to its end (Started, waited for)."""
    return Started(cmd, timeout, **kwargs).result()


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process the suite starts: os.environ with `extra` on top, unbuffered, and without the
    torch.distributed variables that the in-process dist fixture sets (they must not leak into children)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def start_cli(script: str, *args: str, nproc: int = 1, launcher: str = "python", timeout: int = 600,
              env: dict | None = None) -> Started:
    """Start launch/<script> the way a user does: plain python, the deepspeed launcher, or torchrun. Runs that do not
    depend on each other (an uninterrupted run and the one to be killed) start together: each process spends most of
    its few seconds importing on one core, so two at once take little longer than one on a 2-core machine."""
    from rlhf_ds.dist import free_port

    bin_dir = Path(sys.executable).parent
    target = str(REPO / "launch" / script)
    if launcher == "python":
        cmd = [sys.executable, target]
    elif launcher == "deepspeed":
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), target]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), target]
    else:
        raise ValueError(launcher)
    return Started(cmd + list(args), timeout, env=child_env(**(env or {})), cwd=str(REPO))


def run_cli(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """start_cli, waited for."""
    return start_cli(script, *args, **kwargs).result()


class ForkServer:
    """`python launch/<script> ARGS` in one process (refusals of bad input, export, chat, eval_rm, tiny trainings),
    forked from one that has imported every stage (tests/workers/forkserver.py): each run skips the 3.5 s of imports
    a fresh interpreter spends. Runs that launch ranks, test start-up or signals, or are killed use start_cli."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "workers" / "forkserver.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(),
                                     cwd=str(REPO), start_new_session=True)
        self.ready = False

    def run_many(self, runs: list[tuple[str, list[str]]], at_once: int = 2, env: dict | None = None,
                 timeout: int = 300) -> list[subprocess.CompletedProcess]:
        """Each (script, args) run to its end, `at_once` at a time (independent runs that refuse their input use both
        cores), the results in order, as subprocess.run(capture_output=True, text=True) gives them."""
        if not self.ready:
            assert json.loads(self.proc.stdout.readline()) == "ready", "the fork server did not start"
            self.ready = True
        with tempfile.TemporaryDirectory() as tmp:
            requests = [{"script": str(REPO / "launch" / script), "args": [str(a) for a in args],
                         "stdout": f"{tmp}/{i}.out", "stderr": f"{tmp}/{i}.err", "env": env or {},
                         "timeout": timeout} for i, (script, args) in enumerate(runs)]
            self.proc.stdin.write(json.dumps({"runs": requests, "at_once": at_once}) + "\n")
            self.proc.stdin.flush()
            codes = json.loads(self.proc.stdout.readline())
            return [subprocess.CompletedProcess([sys.executable, r["script"], *r["args"]], code,
                                                Path(r["stdout"]).read_text(errors="replace"),
                                                Path(r["stderr"]).read_text(errors="replace"))
                    for r, code in zip(requests, codes)]

    def run(self, script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run_many([(script, list(args))], **kwargs)[0]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session", autouse=True)
def forked_cli():
    """Started with the session, so that its imports (6 s of one core) are done before the first test needs it."""
    server = ForkServer()
    yield server
    server.close()


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n" \
                                 f"{proc.stderr[-6000:]}"
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def rm_runs(tiny_llama, artifacts) -> tuple[Path, Path]:
    """Two reward-model runs with test_resume.rm_args, made at once and once for the session: one uninterrupted, and
    one SIGKILLed as step 5 begins (its last checkpoint: step-4)."""
    from test_resume import rm_args

    straight, killed = artifacts / "rm-straight", artifacts / "rm-killed"
    uninterrupted = start_cli("train_rm.py", *rm_args(tiny_llama, straight))
    proc = run_cli("train_rm.py", *rm_args(tiny_llama, killed), env={"RLHF_DS_DIE_AT": "step:5"})
    check_ok(uninterrupted.result())
    assert proc.returncode == -9, proc.stderr[-3000:]
    return straight, killed


@pytest.fixture(scope="session")
def rm_straight(rm_runs) -> Path:
    """The uninterrupted run, for every test that compares a stopped and resumed run with it."""
    return rm_runs[0]


@pytest.fixture(scope="session")
def rm_killed(rm_runs) -> Path:
    """The killed run; tests take a copy (copy_run) to resume, tamper with or refuse."""
    return rm_runs[1]


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, to, symlinks=True))
