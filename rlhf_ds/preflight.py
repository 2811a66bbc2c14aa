"""Check a multi-node set-up before a run: `python -m rlhf_ds.preflight --hostfile HOSTFILE` (ssh, as DeepSpeed's
pdsh launcher reaches the hosts) or `python -m rlhf_ds.preflight --slurm` inside an allocation (srun, one task per
node). On every host it runs the same Python executable as here and checks:

  reachable   ssh / srun gets there and the same Python path exists (DeepSpeed's launchers run sys.executable)
  versions    python, torch, deepspeed, transformers and rlhf_ds equal this host's
  devices     the accelerator DeepSpeed will use, and at least as many devices as the hostfile's slots
  master      --master_addr resolves there and its TCP port answers (this command listens on it when the master
              is this host)
  output dir  --output_dir is writable there, and is the same folder everywhere (every rank writes its checkpoint
              shards into it)

It prints one table, then one line per problem naming the host and the fix, and exits 1 if there is any.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

from rlhf_ds.errors import UserError

# Runs on each host with `python -c`: prints one JSON line. Kept to the standard library plus what it checks.
PROBE = r'''
import json, os, socket, sys
info = {"host": socket.gethostname(), "python": sys.version.split()[0]}
for name in ("torch", "deepspeed", "transformers", "rlhf_ds"):
    try:
        mod = __import__(name)
        info[name] = getattr(mod, "__version__", "?")
    except Exception as err:
        info[name] = "missing: " + type(err).__name__
try:
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    info["accelerator"] = acc.device_name()
    info["devices"] = acc.device_count() if acc.device_name() != "cpu" else os.cpu_count()
except Exception as err:
    info["accelerator"], info["devices"] = "error: " + str(err)[:80], 0
addr, port, out, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    with socket.create_connection((addr, port), timeout=10):
        info["master"] = "ok"
except socket.gaierror:
    info["master"] = "unresolved"
except ConnectionRefusedError:
    info["master"] = "refused"
except OSError as err:
    info["master"] = "unreachable: " + (err.strerror or type(err).__name__)
if out:
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, ".preflight-" + token + "-" + info["host"]), "w") as f:
            f.write(info["host"])
        info["output_dir"] = "ok"
    except OSError as err:
        info["output_dir"] = "not writable: " + (err.strerror or type(err).__name__)
print("PREFLIGHT " + json.dumps(info), flush=True)
'''

VERSIONED = ("python", "torch", "deepspeed", "transformers", "rlhf_ds")


def parse_hostfile(path: Path) -> list[tuple[str, int]]:
    """DeepSpeed's hostfile: `hostname slots=N` per line, `#` comments, blank lines ignored."""
    if not path.is_file():
        raise UserError(f"{path}: hostfile not found; write one line per node: `hostname slots=N`")
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise UserError(f"{path} line {number}: {raw.strip()!r} is not `hostname slots=N` (N = devices on that "
                            f"host); fix the line")
        if parts[0] in [h for h, _ in hosts]:
            raise UserError(f"{path} line {number}: host {parts[0]} is listed twice; keep one line per host")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise UserError(f"{path}: no hosts; write one line per node: `hostname slots=N`")
    return hosts


def _listen(port: int) -> socket.socket | None:
    """Accept (and drop) connections on the master port while the probes run; None if the port is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        return None
    sock.listen(64)

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
                conn.close()
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return sock


def _is_local(addr: str) -> bool:
    try:
        target = socket.gethostbyname(addr)
    except OSError:
        return False
    if target.startswith("127."):
        return True
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((target, 0))  # only succeeds for an address of this host
        return True
    except OSError:
        return False


def _probe_args(args, token: str) -> list[str]:
    return [args.master_addr, str(args.master_port), str(Path(args.output_dir).resolve()) if args.output_dir else "",
            token]


def run_over_ssh(hosts: list[str], args, token: str) -> dict[str, dict]:
    results: dict[str, dict] = {}
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={args.timeout}"]
    if args.ssh_config:
        ssh += ["-F", args.ssh_config]
    remote = " ".join(shlex.quote(a) for a in [sys.executable, "-c", PROBE, *_probe_args(args, token)])

    def one(host: str) -> None:
        try:
            proc = subprocess.run([*ssh, host, remote], capture_output=True, text=True, timeout=args.timeout + 60)
            results[host] = _parse(proc.stdout, proc.stderr, proc.returncode)
        except subprocess.TimeoutExpired:
            results[host] = {"error": f"no answer within {args.timeout + 60} s"}

    threads = [threading.Thread(target=one, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_over_srun(nodes: list[str], args, token: str) -> dict[str, dict]:
    cmd = ["srun", "--nodes", str(len(nodes)), "--ntasks-per-node", "1", "--overlap", "--kill-on-bad-exit=0",
           sys.executable, "-c", PROBE, *_probe_args(args, token)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout + 120)
    results = {n: {"error": f"srun started nothing here ({proc.stderr.strip()[-200:]})"} for n in nodes}
    for line in proc.stdout.splitlines():
        if line.startswith("PREFLIGHT "):
            info = json.loads(line[len("PREFLIGHT "):])
            match = [n for n in nodes if n == info["host"] or info["host"].startswith(n + ".")]
            results[match[0] if match else info["host"]] = info
    return results


def _parse(stdout: str, stderr: str, rc: int) -> dict:
    for line in stdout.splitlines():
        if line.startswith("PREFLIGHT "):
            return json.loads(line[len("PREFLIGHT "):])
    last = (stderr.strip().splitlines() or [f"exit code {rc}"])[-1]
    return {"error": last[:200]}


def check(hosts: list[tuple[str, int]], results: dict[str, dict], local: dict, args, token: str) -> list[str]:
    """The problems, one line each: what is wrong on which host, and the fix."""
    problems = []
    for host, slots in hosts:
        info = results.get(host, {"error": "no answer"})
        if "error" in info:
            how = "srun" if args.slurm else "ssh"
            fix = ("check that the node is up and the venv exists there at the same path" if args.slurm else
                   f"passwordless ssh to {host} must work (`ssh {host} true`), and {sys.executable} must exist "
                   f"there: the same venv at the same path on every node")
            problems.append(f"{host}: not reachable by {how}: {info['error']}. Fix: {fix}")
            continue
        for key in VERSIONED:
            if info.get(key) != local.get(key):
                problems.append(f"{host}: {key} {info.get(key)} here {local.get(key)}. Fix: install the same "
                                f"versions on every node (pip install -r requirements.txt -e . in the same venv)")
        if info.get("accelerator") != local.get("accelerator"):
            problems.append(f"{host}: accelerator {info.get('accelerator')}, this host {local.get('accelerator')}. "
                            f"Fix: the same DS_ACCELERATOR on every node (in .deepspeed_env for the pdsh launcher)")
        elif slots and info.get("accelerator") != "cpu" and int(info.get("devices") or 0) < slots:
            problems.append(f"{host}: {info.get('devices')} device(s) seen, the hostfile gives it slots={slots}. "
                            f"Fix: lower slots= or check CUDA_VISIBLE_DEVICES / the GPU allocation")
        if info.get("master") != "ok":
            state = info.get("master")
            fix = (f"{args.master_addr} does not resolve there: use an address, or add it to /etc/hosts"
                   if state == "unresolved" else
                   f"open TCP port {args.master_port} between the nodes, or pick a reachable --master_addr")
            problems.append(f"{host}: master {args.master_addr}:{args.master_port} {state}. Fix: {fix}")
        if args.output_dir and info.get("output_dir") != "ok":
            problems.append(f"{host}: --output_dir {args.output_dir} {info.get('output_dir')}. Fix: use a folder "
                            f"on a filesystem every node can write")
    if args.output_dir:
        out = Path(args.output_dir)
        for host, _ in hosts:
            info = results.get(host, {})
            if info.get("output_dir") == "ok" and not (out / f".preflight-{token}-{info['host']}").exists():
                problems.append(f"{host}: writes to --output_dir {out} do not show up on this host: it is not a "
                                f"shared filesystem. Fix: put --output_dir on storage every node mounts (every rank "
                                f"writes its checkpoint shards there)")
        for marker in out.glob(f".preflight-{token}-*"):
            marker.unlink(missing_ok=True)
    return problems


def table(hosts: list[tuple[str, int]], results: dict[str, dict]) -> str:
    cols = ["host", "slots", "python", "torch", "deepspeed", "rlhf_ds", "devices", "master", "output_dir"]
    rows = [cols]
    for host, slots in hosts:
        info = results.get(host, {})
        if "error" in info:
            rows.append([host, str(slots), "unreachable"] + [""] * (len(cols) - 3))
            continue
        devices = f"{info.get('devices')} {info.get('accelerator')}"
        rows.append([host, str(slots or "-")] + [str(info.get(c, "")) for c in cols[2:6]] + [
            devices, str(info.get("master", "")), str(info.get("output_dir", "-"))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ds.preflight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--hostfile", help="DeepSpeed hostfile (`host slots=N` per line); hosts reached by ssh")
    where.add_argument("--slurm", action="store_true", help="the nodes of this SLURM allocation, reached by srun")
    parser.add_argument("--master_addr", help="default: the first host")
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("--output_dir", help="check that it is writable and shared by every node")
    parser.add_argument("--ssh_config", help="ssh -F FILE (default: ~/.ssh/config)")
    parser.add_argument("--timeout", type=int, default=20, help="seconds to wait for each host")
    args = parser.parse_args(argv)
    if args.slurm:
        if "SLURM_JOB_NODELIST" not in os.environ:
            raise UserError("--slurm: not inside a SLURM allocation (no SLURM_JOB_NODELIST); run it from a job "
                            "script or salloc, or use --hostfile")
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        hosts = [(n, 0) for n in nodes]
    else:
        hosts = parse_hostfile(Path(args.hostfile))
    args.master_addr = args.master_addr or hosts[0][0]
    master_here = _is_local(args.master_addr)
    listener = _listen(args.master_port) if master_here else None
    if master_here and listener is None:
        raise UserError(f"master port {args.master_port} on {args.master_addr} (this host) is already in use. "
                        f"Fix: pick a free --master_port (and pass the same one to the launcher), or stop what "
                        f"holds it")
    token = uuid.uuid4().hex[:8]
    local = {"python": sys.version.split()[0]}
    # this host's versions and accelerator, to compare the others with (no output-dir marker from here)
    local_run = subprocess.run([sys.executable, "-c", PROBE, args.master_addr, str(args.master_port), "", token],
                               capture_output=True, text=True)
    local.update(_parse(local_run.stdout, local_run.stderr, local_run.returncode))
    try:
        names = [h for h, _ in hosts]
        results = run_over_srun(names, args, token) if args.slurm else run_over_ssh(names, args, token)
    finally:
        if listener is not None:
            listener.close()
    print(table(hosts, results), flush=True)
    problems = check(hosts, results, local, args, token)
    for line in problems:
        print(f"preflight: {line}", file=sys.stderr, flush=True)
    if problems:
        return 1
    print(f"preflight: {len(hosts)} host(s) ready (master {args.master_addr}:{args.master_port})", flush=True)
    return 0


if __name__ == "__main__":
    from rlhf_ds.cli import run_command

    run_command("preflight")
