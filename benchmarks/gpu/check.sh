#!/usr/bin/env bash
# rlhf_ds's CUDA path, end to end, in one run on a lent GPU machine (see benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/check.sh                         # on the GPU machine, with .whl/ carried beside it
#   SKIP_WHEELS=1 GPU_CHECK_QUICK=1 OUT=/tmp/o bash benchmarks/gpu/check.sh   # here, on CPU, with .venv active
#
# Every step runs under its own `timeout`, records its exit code and seconds, and the run goes on after a failing
# step. The stages run in three groups of steps that do not depend on each other, each group's steps at the same
# time (one small GPU and 16 cores: start-up, not the GPU, is what they spend); the benchmarks run one at a time.
# What comes back (all under $OUT, flat): log.txt (everything), summary.txt (step, exit code, seconds, peak GPU
# memory while it ran), results.jsonl (the JSON lines of the benchmarks and parity checks), gpu_trace.txt
# (nvidia-smi every 0.5 s), runs.tar.gz (each stage's small outputs: metrics, eval results, samples, args; no weights).
#
# Knobs (environment): GPU_CHECK_QUICK=1 skips the benchmarks and the real-size steps; GPU_CHECK_SERIAL=1 runs the
# groups' steps one at a time; GPU_CHECK_BUDGET_S (default 330): no step starts after this many seconds;
# GPU_CHECK_HARD_S (default 420): no step runs past this many seconds; GPU_CHECK_BENCH_STEPS / _WARMUP (3 / 1):
# timed and warm-up steps of bench_ppo.py; GPU_CHECK_REAL_TINY=1 builds the "real-size" model small (to try those
# steps on a CPU); GPU_CHECK_ONLY: comma-separated step names to run (the others are skipped, also those they
# need); GPU_CHECK_WORK (default /tmp/rlhf_ds_gpu_check): the scratch folder, emptied first. SKIP_WHEELS=1: do not
# install .whl/ (use the python3 on PATH as it is).
set -uo pipefail
if [ "${SKIP_WHEELS:-0}" != 1 ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
  WHEELS_RC=$?
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  WHEELS_RC=skipped
fi
T0=$(date +%s)
REPO=$(pwd)
[ -f "$REPO/launch/train_sft.py" ] || { echo "run from the repository root (bash benchmarks/gpu/check.sh)"; exit 2; }
OUT=${OUT:-$(mktemp -d /tmp/gpu_check_out.XXXXXX)}
mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-/tmp/rlhf_ds_gpu_check}
case "$WORK" in /tmp/?*) rm -rf "$WORK" ;; *) echo "GPU_CHECK_WORK must lie under /tmp"; exit 2 ;; esac
mkdir -p "$WORK/logs" "$WORK/runs" "$WORK/py"
QUICK=${GPU_CHECK_QUICK:-0}
SERIAL=${GPU_CHECK_SERIAL:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-330}
HARD=${GPU_CHECK_HARD_S:-420}
BENCH_STEPS=${GPU_CHECK_BENCH_STEPS:-3}
BENCH_WARMUP=${GPU_CHECK_BENCH_WARMUP:-1}
ONLY=${GPU_CHECK_ONLY:-}

exec 3>&1 4>&2
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!

export PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME=$WORK/hf_home TORCH_EXTENSIONS_DIR=$WORK/torch_extensions MAX_JOBS=${MAX_JOBS:-16}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  HAVE_GPU=1
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  [ -n "$CAP" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP}
  if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null 2>&1; then
      CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    elif [ -x /usr/local/cuda/bin/nvcc ]; then
      CUDA_HOME=/usr/local/cuda
      export PATH=$PATH:/usr/local/cuda/bin
    fi
    [ -n "${CUDA_HOME:-}" ] && export CUDA_HOME
  fi
  # GPU memory and load every 0.5 s for the whole run (the summary takes each step's peak from it)
  ( while :; do
      echo "$(date +%s.%N) $(nvidia-smi --query-gpu=memory.used,utilization.gpu,power.draw --format=csv,noheader,nounits 2>/dev/null | head -1)"
      sleep 0.5
    done ) > "$OUT/gpu_trace.txt" 2>/dev/null &
  TRACE_PID=$!
fi
echo "# rlhf_ds GPU check: $(date -u +%FT%TZ) on $(hostname 2>/dev/null || cat /etc/hostname 2>/dev/null);" \
     "repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
     "$(git status --porcelain 2>/dev/null | grep -q . && echo '(with uncommitted changes)')"
echo "# wheels: $WHEELS_RC; OUT=$OUT WORK=$WORK QUICK=$QUICK SERIAL=$SERIAL BUDGET=${BUDGET}s HARD=${HARD}s" \
     "GPU=$HAVE_GPU CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
printf "%s\t%s\t%s\t%s\t%s\n" step rc seconds start end > "$WORK/steps.tsv"

# step NAME TIMEOUT_S CMD...: CMD under timeout, its output to the log (tee) and to $WORK/logs/NAME.log; records the
# exit code (124: timed out; "skip": not started) and times in $WORK/steps.tsv.
# bstep: the same in the background, its output to its own log only (printed after `join`).
step() { _step tee "$@"; }
BG_PIDS=()
BG_NAMES=()
bstep() {
  if [ "$SERIAL" = 1 ]; then
    _step tee "$@"
  else
    _step quiet "$@" &
    BG_PIDS+=($!)
    BG_NAMES+=("$1")
  fi
}
join() {
  local pid name
  for pid in "${BG_PIDS[@]}"; do wait "$pid"; done
  for name in "${BG_NAMES[@]}"; do
    [ -f "$WORK/logs/$name.log" ] || continue
    echo
    echo "=== [$name] output (ran in parallel with: ${BG_NAMES[*]})"
    cat "$WORK/logs/$name.log"
    echo "=== [$name] exit $(awk -F'\t' -v n="$name" '$1 == n {rc = $2} END {print rc}' "$WORK/steps.tsv")"
  done
  BG_PIDS=()
  BG_NAMES=()
}
_step() {
  local mode=$1 name=$2 limit=$3
  shift 3
  local now elapsed rc start end
  now=$(date +%s)
  elapsed=$((now - T0))
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    printf "%s\tskip\t0\t%s\t%s\n" "$name" "$now" "$now" >> "$WORK/steps.tsv"
    return 0
  fi
  if [ "$elapsed" -ge "$BUDGET" ] || [ $((HARD - elapsed)) -lt 20 ]; then
    echo "=== [$name] SKIPPED: ${elapsed}s elapsed (budget ${BUDGET}s)"
    printf "%s\tskip\t0\t%s\t%s\n" "$name" "$now" "$now" >> "$WORK/steps.tsv"
    return 0
  fi
  [ $((HARD - elapsed)) -lt "$limit" ] && limit=$((HARD - elapsed))
  echo
  echo "=== [$name] start at ${elapsed}s, timeout ${limit}s: $*"
  start=$(date +%s.%N)
  if [ "$mode" = tee ]; then
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log"
    rc=${PIPESTATUS[0]}
  else
    timeout -k 15 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1 < /dev/null
    rc=$?
  fi
  end=$(date +%s.%N)
  printf "%s\t%s\t%s\t%s\t%s\n" "$name" "$rc" "$(awk "BEGIN {printf \"%.1f\", $end - $start}")" "$start" "$end" \
    >> "$WORK/steps.tsv"
  echo "=== [$name] exit $rc after $(awk "BEGIN {printf \"%.0f\", $end - $start}")s"
  return 0
}
# the JSON objects a step printed (one per line), tagged with the step's name, appended to results.jsonl
collect_json() {
  python3 "$WORK/py/collect_json.py" "$1" "$WORK/logs/$1.log" >> "$OUT/results.jsonl"
}
free_port() { python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

# ------------------------------------------------------------------------------------------ the Python parts
cat > "$WORK/py/collect_json.py" <<'EOF'
import json, sys
name, path = sys.argv[1], sys.argv[2]
try:
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
except OSError:
    lines = []
for line in lines:
    line = line.strip()
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            print(json.dumps({"check_step": name, **obj}))
EOF

# every carried package's and rlhf_ds's requirements against what this interpreter sees (carried first)
cat > "$WORK/py/requirements.py" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
from packaging.markers import default_environment
from packaging.requirements import Requirement

repo = pathlib.Path(sys.argv[1])
env = {**default_environment(), "extra": ""}
carried = sorted({re.split(r"-\d", p.name)[0] for p in (repo / ".whl").glob("*.whl")})
names = carried + ["accelerate", "huggingface_hub", "torch", "numpy", "pyarrow", "pandas", "safetensors"]
problems = 0


def check(req_text: str, owner: str, count: bool) -> None:
    global problems
    req = Requirement(req_text)
    if req.marker and not req.marker.evaluate(env):
        return
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        print(f"  MISSING  {owner} needs {req_text}")
        problems += count
        return
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        print(f"  {'CONFLICT' if count else 'differs '} {owner} needs {req_text}, have {have}")
        problems += count


for name in dict.fromkeys(names):
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        print(f"MISSING {name}")
        problems += 1
        continue
    print(f"{name} {dist.version} ({dist.locate_file('')})")
    for r in dist.requires or []:
        check(r, name, True)
print("rlhf_ds's requirements.txt (informational: the machine's own torch and numpy are meant to differ):")
for line in (repo / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        check(line, "rlhf_ds", False)
print(f"{problems} problem(s) in the carried packages' requirements")
sys.exit(1 if problems else 0)
EOF

cat > "$WORK/py/imports.py" <<'EOF'
import time
t = time.time()
import torch, transformers, peft, datasets, tokenizers, accelerate, pydantic, deepspeed, rlhf_ds
from deepspeed.accelerator import get_accelerator
from rlhf_ds.engines.precision import on_cuda, resolve_precision
print(f"imported in {time.time() - t:.1f}s: torch {torch.__version__} transformers {transformers.__version__} "
      f"peft {peft.__version__} datasets {datasets.__version__} tokenizers {tokenizers.__version__} "
      f"accelerate {accelerate.__version__} deepspeed {deepspeed.__version__} pydantic {pydantic.__version__}")
print("deepspeed accelerator:", get_accelerator()._name, "| rlhf_ds on_cuda:", on_cuda(),
      "| --bf16 resolves to", resolve_precision(bf16=True).name, "| --fp16 resolves to", resolve_precision(fp16=True).name)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs,"
          f" bf16 supported {torch.cuda.is_bf16_supported()}")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(20):
        a @ a
    torch.cuda.synchronize()
    print(f"bf16 4096^3 matmul: {20 * 2 * 4096**3 / (time.time() - t) / 1e12:.0f} TFLOP/s")
EOF

# DeepSpeed's AdamW on CUDA is FusedAdam, compiled at first use (nvcc + ninja)
cat > "$WORK/py/fused_adam.py" <<'EOF'
import sys, time
import torch
import rlhf_ds  # noqa: F401  (what every rlhf_ds process does first: e.g. it makes TORCH_CUDA_ARCH_LIST readable)
if not torch.cuda.is_available():
    print("no CUDA: DeepSpeed's CPU path uses torch's AdamW (rlhf_ds sets torch_adam), nothing to build")
    sys.exit(0)
from deepspeed.ops.op_builder import FusedAdamBuilder
t = time.time()
FusedAdamBuilder().load()
print(f"fused_adam op ready in {time.time() - t:.1f}s")
from deepspeed.ops.adam import FusedAdam
p = torch.nn.Parameter(torch.ones(1000, device="cuda"))
opt = FusedAdam([p], lr=0.1)
p.grad = torch.ones_like(p)
opt.step()
torch.cuda.synchronize()
print("one FusedAdam step: p[0] =", p[0].item(), "(expected 0.9)")
assert abs(p[0].item() - 0.9) < 1e-3
EOF

cat > "$WORK/py/tiny_models.py" <<'EOF'
import json, sys, time
from pathlib import Path
from rlhf_ds.models import tiny
work, repo = Path(sys.argv[1]), Path(sys.argv[2])
t = time.time()
tiny.train_tokenizer(work / "tokenizer")
tiny.make_model(work / "tiny-llama", work / "tokenizer", "llama")
tiny.make_model(work / "tiny-opt", work / "tokenizer", "opt")
print(f"tokenizer, tiny llama and tiny opt in {time.time() - t:.1f}s:",
      sorted(p.name for p in (work / "tiny-llama").iterdir()))
# preference pairs with short answers behind long prompts: DPO then packs [prompt | chosen | rejected] into one row
# (it does where that saves at least a fifth of the tokens; here about half), so that path trains on the GPU too
pairs = []
for r in json.loads((repo / "data" / "comparison_gpt4_data_en.partial.json").read_text(encoding="utf-8")):
    good, bad = r["output"][0], r["output"][1]
    if len(r["instruction"]) + len(r.get("input", "")) >= 120 and good[:40] != bad[:40]:
        pairs.append({"instruction": r["instruction"], "input": r.get("input", ""), "output": [good[:40], bad[:40]]})
(work / "short_answer_pairs.json").write_text(json.dumps(pairs[:128], ensure_ascii=False), encoding="utf-8")
print(len(pairs[:128]), "short-answer pairs written")
EOF

# The hybrid engine on the GPU, as tests/workers/hybrid_check.py checks it on CPU (its tensors moved to the GPU):
# greedy tokens equal to plain generate (also with GRPO's shared prefill), weights restored, ZeRO-3 hooks kept, the
# next training step equal to a never-switched engine's; Llama ZeRO-2/3 x LoRA/full + layer-by-layer, OPT ZeRO-3.
cat > "$WORK/py/hybrid_parity.py" <<'EOF'
import copy, json, sys, traceback
from pathlib import Path
work, repo = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(repo / "tests" / "workers"))
import hybrid_check as hc
from rlhf_ds import dist

dist.init_distributed()
dev = dist.device()


class _CopyToDevice:  # hybrid_check's "plain" model (a deepcopy outside DeepSpeed) on the GPU as well
    @staticmethod
    def deepcopy(obj):
        return copy.deepcopy(obj).to(dev)


hc.copy = _CopyToDevice
round_trip = hc.round_trip
hc.round_trip = lambda model_dir, stage, ft, layers, prompts, mask, settings, inputs: round_trip(
    model_dir, stage, ft, layers, prompts.to(dev), mask.to(dev), settings, {k: v.to(dev) for k, v in inputs.items()})
results, failed = {}, 0
combos = [("tiny-llama", s, ft, 0) for s in (2, 3) for ft in ("lora", "full")] + [("tiny-llama", 3, "lora", 1)] + \
         [("tiny-opt", 3, ft, 0) for ft in ("lora", "full")]
for name, stage, ft, layers in combos:
    key = f"{name}|zero{stage}{'-layers' if layers else ''}|{ft}"
    try:
        r = hc.check(str(work / name), stage, ft, layers)[0]
        ok = (r["same_tokens"] and r["prompt_shared"] and r["grouped_same_tokens"] and r["weight_diff"] <= 1e-6
              and r["hooks_kept"] and r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-6)
        results[key] = {"ok": ok, **r}
    except Exception as e:
        traceback.print_exc()
        results[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    failed += not results[key]["ok"]
    print(key, json.dumps(results[key]), flush=True)
print(json.dumps({"check": "hybrid_parity", "device": str(dev), "failed": failed, "results": results}), flush=True)
dist.shutdown(1 if failed else 0)
EOF

# DPO's packed pairs against separate rows on the GPU (tests/trainers/test_train_dpo.py's check): SDPA and eager,
# left and right padding, fp32 (must agree to 1e-4) and bf16 (reported; a loose bound)
cat > "$WORK/py/dpo_packing_parity.py" <<'EOF'
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from rlhf_ds.data.collate import PreferenceCollator
from rlhf_ds.trainers.dpo import answer_logprobs, takes_4d_mask

work = Path(sys.argv[1])
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
rows = []
for prompt_len, chosen_len, rejected_len in ((9, 4, 12), (3, 15, 2), (14, 7, 7)):
    prompt = torch.randint(10, 1500, (prompt_len,), generator=g).tolist()
    rows.append({"chosen_ids": prompt + torch.randint(10, 1500, (chosen_len,), generator=g).tolist(),
                 "rejected_ids": prompt + torch.randint(10, 1500, (rejected_len,), generator=g).tolist(),
                 "chosen_prompt_len": prompt_len, "rejected_prompt_len": prompt_len})
results, failed = {}, 0
for name in ("tiny-llama", "tiny-opt"):
    for attention in ("sdpa", "eager"):
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(str(work / name), attn_implementation=attention,
                                                         dtype=dtype).to(dev).eval()
            for side in ("left", "right"):
                batch = {k: v.to(dev) for k, v in PreferenceCollator(0, side)(rows).items()}
                with torch.no_grad():
                    separate = answer_logprobs(model, batch, share_prompt=False)
                    shared = answer_logprobs(model, batch, share_prompt=True)
                diff = (shared[0].float() - separate[0].float()).abs().max().item()
                counts = shared[1].tolist() == separate[1].tolist() == [4, 15, 7, 12, 2, 7]
                fp32 = dtype == torch.float32
                ok = counts and takes_4d_mask(model) and (diff <= 1e-4 if fp32 else diff <= 0.5)
                key = f"{name}|{attention}|{'fp32' if fp32 else 'bf16'}|{side}"
                results[key] = {"ok": ok, "max_abs_diff": diff, "counts_ok": counts,
                                "takes_4d_mask": takes_4d_mask(model)}
                failed += not ok
                print(key, json.dumps(results[key]), flush=True)
print(json.dumps({"check": "dpo_packing_parity", "device": dev, "failed": failed, "results": results}))
sys.exit(1 if failed else 0)
EOF

# a random model of Qwen2.5-0.5B's shape (nothing downloaded) with the tiny tokenizer, and a reward model on it
cat > "$WORK/py/real_models.py" <<'EOF'
import os, shutil, sys, time
from pathlib import Path
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from rlhf_ds.models.heads import ScalarHeadModel, save_scalar_model
from rlhf_ds.models.loading import load_backbone, load_tokenizer

work = Path(sys.argv[1])
tok_dir, policy, reward = work / "tokenizer", work / "qwen05", work / "qwen05_rm"
tok = AutoTokenizer.from_pretrained(str(tok_dir))
small = os.environ.get("GPU_CHECK_REAL_TINY") == "1"
shape = dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2) if small else \
        dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2)
config = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
t = time.time()
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = Qwen2ForCausalLM(config)
model = model.to(torch.bfloat16)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters built in {time.time() - t:.1f}s")
model.save_pretrained(str(policy))
del model
for f in tok_dir.iterdir():
    shutil.copy(f, policy / f.name)
torch.manual_seed(1)
head = ScalarHeadModel(load_backbone(policy, torch.float32))
save_scalar_model(head, head.state_dict(), reward,
                  {"kind": "reward", "base_model": str(policy), "finetuning_type": "full", "template": "plain",
                   "max_length": 128, "precision": "bf16"}, load_tokenizer(policy))
print(f"policy and reward model saved in {time.time() - t:.1f}s")
EOF

# one GRPO step (4 prompts x 4 answers x 64 tokens, ZeRO-3, hybrid on) on that model: times and peak GPU memory
cat > "$WORK/py/real_grpo_step.py" <<'EOF'
import json, os, sys
from pathlib import Path
import torch
import rlhf_ds.benchmarks as bench

work = Path(sys.argv[1])
bench.workload_model = lambda root: (work / "qwen05", work / "qwen05_rm")
result = bench.bench_ppo_worker(3, "on", 2, 1, "grpo")
small = os.environ.get("GPU_CHECK_REAL_TINY") == "1"
result["model"] = "random Qwen2.5-0.5B shape" + (" (GPU_CHECK_REAL_TINY=1: built small)" if small else "")
if torch.cuda.is_available():
    result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
print(json.dumps(result))
EOF

cat > "$WORK/py/summary.py" <<'EOF'
import sys
steps_path, trace_path, t0 = sys.argv[1], sys.argv[2], float(sys.argv[3])
trace = []
try:
    for line in open(trace_path):
        parts = line.replace(",", " ").split()
        if len(parts) >= 2:
            try:
                trace.append((float(parts[0]), float(parts[1])))
            except ValueError:
                pass
except OSError:
    pass
rows = [line.rstrip("\n").split("\t") for line in open(steps_path)][1:]
print(f"{'step':<20} {'exit':>5} {'seconds':>8} {'at_s':>6} {'peak_gpu_MiB':>12}  status")
for name, rc, secs, start, end in rows:
    start, end = float(start), float(end)
    peak = max((m for t, m in trace if start <= t <= end), default=None)
    status = {"0": "ok", "skip": "skipped", "124": "TIMEOUT", "137": "KILLED (timeout)"}.get(rc, "FAILED")
    print(f"{name:<20} {rc:>5} {float(secs):>8.1f} {start - t0:>6.0f} {'' if peak is None else int(peak):>12}  {status}")
bad = sum(r[1] not in ("0", "skip") for r in rows)
print(f"\n{len(rows)} steps: {sum(r[1] == '0' for r in rows)} ok, {bad} failed, "
      f"{sum(r[1] == 'skip' for r in rows)} skipped; {max((float(r[4]) for r in rows), default=t0) - t0:.0f}s in all"
      f" (peak_gpu_MiB: the whole GPU's, over steps that ran at the same time too)")
sys.exit(1 if bad else 0)
EOF

# FusedAdam's build starts now, beside the first steps (the fused_adam step then waits for it or loads it)
if [ "$HAVE_GPU" = 1 ] && { [ -z "$ONLY" ] || [[ ",$ONLY," == *",fused_adam,"* ]]; }; then
  timeout 300 python3 "$WORK/py/fused_adam.py" > "$WORK/logs/fused_adam_early_build.log" 2>&1 < /dev/null &
fi

# ------------------------------------------------------------------------------------------ 0. the machine
step env 60 bash -c '
  nvidia-smi || echo "(no nvidia-smi)"
  echo "--- python: $(command -v python3) $(python3 --version 2>&1); nproc $(nproc); $(free -g 2>/dev/null | sed -n 2p)"
  echo "--- nvcc: $(command -v nvcc || echo none)"; nvcc --version 2>/dev/null | tail -2
  python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), \"nccl\", torch.cuda.nccl.version() if torch.cuda.is_available() else None, \"cudnn\", torch.backends.cudnn.version())"
  python3 -m pip show torch transformers tokenizers peft deepspeed datasets accelerate huggingface_hub numpy pyarrow pandas fsspec pydantic pydantic_core regex safetensors sentencepiece 2>/dev/null | grep -E "^(Name|Version|Location):"
  ls /tmp/site 2>/dev/null | head -50'
step requirements 60 python3 "$WORK/py/requirements.py" "$REPO"
step imports 120 python3 "$WORK/py/imports.py"
# If FusedAdam cannot be built, the stages below get a --deepspeed config with torch's AdamW instead (and say so).
step fused_adam 240 python3 "$WORK/py/fused_adam.py"
DSCFG=()
if [ "$HAVE_GPU" = 1 ] && [ "$(awk -F'\t' '$1 == "fused_adam" {print $2}' "$WORK/steps.tsv")" != 0 ]; then
  cat > "$WORK/ds_torch_adam.json" <<'EOF'
{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
 "steps_per_print": 1000000000, "bf16": {"enabled": "auto"},
 "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
 "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto",
                                           "torch_adam": true}},
 "zero_optimization": {"stage3_param_persistence_threshold": "auto"}}
EOF
  DSCFG=(--deepspeed "$WORK/ds_torch_adam.json")
  echo "!!! fused_adam failed: the training stages below run with ${DSCFG[*]} (torch's AdamW)"
fi

# ------------------------------------------------------------------------------------------ 1. tiny models
TINY=$WORK/tiny-llama
step tiny_models 90 python3 "$WORK/py/tiny_models.py" "$WORK" "$REPO"

# ------------------------------------------------------------------------------------------ 2. every stage, tiny
R=$WORK/runs
# group 1: what needs only the tiny models
bstep sft_lora 150 python3 launch/train_sft.py --model_name_or_path "$TINY" --do_train --dataset alpaca_gpt4_zh \
  --max_samples 160 --finetuning_type lora --lora_target q_proj,v_proj,down_proj,lm_head --output_dir "$R/sft" \
  --do_eval --eval_before_train --val_size 32 --per_device_train_batch_size 8 --learning_rate 1e-2 --max_steps 12 \
  --logging_steps 1 --max_length 128 --save_steps 6 --disable_tqdm --plot_loss --bf16 "${DSCFG[@]}"
bstep rm_lora 150 python3 launch/train_rm.py --model_name_or_path "$TINY" --do_train --dataset comparison_gpt4_en \
  --max_samples 160 --finetuning_type lora --lora_target q_proj,v_proj --output_dir "$R/rm" --do_eval --val_size 32 \
  --per_device_train_batch_size 8 --learning_rate 1e-3 --max_steps 10 --logging_steps 1 --max_length 128 \
  --save_steps 5 --disable_tqdm --bf16 "${DSCFG[@]}"
# DPO on pairs whose prompt is shared in one packed row (a 4D attention mask through SDPA, forward and backward),
# full fine-tuning, the reference forward every step
bstep dpo_shared_prompt 120 python3 launch/train_dpo.py --model_name_or_path "$TINY" --do_train \
  --dataset "$WORK/short_answer_pairs.json" --max_samples 64 --output_dir "$R/dpo_shared" --max_length 192 \
  --per_device_train_batch_size 8 --finetuning_type full --learning_rate 1e-4 --max_steps 4 --logging_steps 1 \
  --no_precompute_ref_logps --save_steps 0 --disable_tqdm --bf16 "${DSCFG[@]}"
bstep hybrid_parity 150 python3 "$WORK/py/hybrid_parity.py" "$WORK" "$REPO"
bstep dpo_packing_parity 90 python3 "$WORK/py/dpo_packing_parity.py" "$WORK"
join
collect_json hybrid_parity
collect_json dpo_packing_parity

# group 2: what needs the SFT and RM outputs
# PPO, actor under ZeRO-3 with every parameter partitioned, through the deepspeed launcher; reference and reward
# offloaded to CPU memory; EMA, ptx loss, evaluation and checkpoints on
bstep ppo_zero3_hybrid 180 deepspeed --num_gpus 1 --master_port "$(free_port)" launch/train_ppo.py \
  --model_name_or_path "$TINY" --sft_model "$R/sft" --reward_model "$R/rm" --do_train --dataset alpaca_gpt4_zh \
  --max_samples 64 --output_dir "$R/ppo_z3" --finetuning_type lora --actor_zero_stage 3 --critic_zero_stage 2 \
  --stage3_param_persistence_threshold 0 --hybrid_engine on --offload_reference_model --offload_reward_model \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --max_steps 4 --logging_steps 1 \
  --learning_rate 1e-3 --max_new_tokens 16 --max_prompt_length 64 --do_eval --val_size 8 --eval_steps 2 \
  --save_steps 2 --enable_ema --ptx_coef 0.5 --num_samples_to_log 4 --disable_tqdm --bf16 "${DSCFG[@]}"
# PPO under ZeRO-2, full fine-tuning, fp16 (loss scaling), plain python
bstep ppo_zero2_hybrid 150 python3 launch/train_ppo.py --model_name_or_path "$TINY" --sft_model "$R/sft" \
  --reward_model "$R/rm" --do_train --dataset alpaca_gpt4_zh --max_samples 64 --output_dir "$R/ppo_z2" \
  --finetuning_type full --zero_stage 2 --hybrid_engine on --per_device_train_batch_size 4 \
  --gradient_accumulation_steps 2 --max_steps 4 --logging_steps 1 --learning_rate 1e-4 --max_new_tokens 16 \
  --max_prompt_length 64 --save_steps 0 --disable_tqdm --fp16 "${DSCFG[@]}"
# GRPO with the rule rewards on the arithmetic problems, ZeRO-3, KL in the loss (a reference), shared prefill of
# the 4 answers per prompt, through torchrun
bstep grpo_math 150 python3 -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 \
  --master_port "$(free_port)" launch/train_grpo.py --model_name_or_path "$TINY" --sft_model "$R/sft" --do_train \
  --dataset arithmetic_train --max_samples 32 --reward_fn math,format --reward_weights 1.0,0.5 \
  --do_eval --eval_dataset arithmetic_test --max_eval_samples 16 --eval_steps 2 --output_dir "$R/grpo" \
  --finetuning_type lora --zero_stage 3 --stage3_param_persistence_threshold 0 --init_kl_coef 0.05 --kl_in_loss \
  --per_device_train_batch_size 2 --n_samples_per_prompt 4 --max_steps 3 --logging_steps 1 --learning_rate 1e-3 \
  --max_new_tokens 24 --max_prompt_length 96 --save_steps 0 --num_samples_to_log 4 --disable_tqdm --bf16 "${DSCFG[@]}"
bstep dpo_lora 150 python3 launch/train_dpo.py --model_name_or_path "$TINY" --sft_model "$R/sft" --do_train \
  --dataset comparison_gpt4_en --max_samples 96 --output_dir "$R/dpo" --max_length 96 --zero_stage 3 \
  --per_device_train_batch_size 4 --finetuning_type lora --lora_target q_proj,v_proj --learning_rate 5e-3 \
  --max_steps 6 --logging_steps 1 --do_eval --val_size 16 --beta 0.5 --save_steps 3 --disable_tqdm --bf16 "${DSCFG[@]}"
bstep eval_rm 90 python3 launch/eval_rm.py --reward_model "$R/rm" --dataset comparison_gpt4_en_heldout \
  --max_samples 64 --max_length 128 --output_file "$R/eval_rm.json" --predictions_file "$R/eval_rm_predictions.jsonl" \
  --per_device_eval_batch_size 16 --bf16
bstep chat_sft 90 python3 launch/chat.py --model "$R/sft" --prompt "中国的首都是哪里？" --max_new_tokens 16 --bf16
join

# group 3: what needs the PPO output
step export_ppo 90 python3 launch/export.py --model_dir "$R/ppo_z3" --output_dir "$R/ppo_z3_export"

# ------------------------------------------------------------------------------------------ 3. benchmarks
if [ "$QUICK" != 1 ]; then
  step bench_ppo_ppo 240 python3 launch/bench_ppo.py --algo ppo --worlds 1 --stages 2,3 --hybrid on,off \
    --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP"
  collect_json bench_ppo_ppo
  step bench_generation 120 python3 launch/bench_generation.py --batch 16 --prompt 64 --new_tokens 128 --repeats 2
  collect_json bench_generation
  step bench_ppo_grpo 150 python3 launch/bench_ppo.py --algo grpo --worlds 1 --stages 2,3 --hybrid on \
    --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP"
  collect_json bench_ppo_grpo
  step bench_ppo_dpo 150 python3 launch/bench_ppo.py --algo dpo --worlds 1 --stages 2,3 --reference forward \
    --steps "$BENCH_STEPS" --warmup "$BENCH_WARMUP"
  collect_json bench_ppo_dpo

  # ---------------------------------------------------------------------------------------- 4. real size
  step real_models 150 python3 "$WORK/py/real_models.py" "$WORK"
  # 16 prompts x 256 new tokens: ZeRO-3 engine.module.generate vs our hybrid engine vs plain Hugging Face
  step real_generation 150 python3 launch/bench_generation.py --model "$WORK/qwen05" --batch 16 --prompt 64 \
    --new_tokens 256 --repeats 1
  collect_json real_generation
  step real_grpo_step 180 python3 "$WORK/py/real_grpo_step.py" "$WORK"
  collect_json real_grpo_step
fi

# ------------------------------------------------------------------------------------------ the summary
[ -n "${TRACE_PID:-}" ] && kill "$TRACE_PID" 2>/dev/null
python3 "$WORK/py/summary.py" "$WORK/steps.tsv" "$OUT/gpu_trace.txt" "$T0" > "$OUT/summary.txt"
RC=$?
# each stage's small outputs (no weights, no optimizer states, no tokenizers)
(cd "$WORK" && find runs steps.tsv logs/fused_adam_early_build.log -type f -size -3M ! -name '*.safetensors' \
   ! -name '*.bin' ! -name '*.pt' ! -name '*.pth' ! -name '*.npy' ! -name 'tokenizer*' ! -name '*.jinja' \
   ! -name 'zero_to_*.py' ! -name README.md -print0 2>/dev/null | tar -czf "$OUT/runs.tar.gz" --null -T -)
touch "$OUT/results.jsonl"
echo
cat "$OUT/summary.txt"
echo "results.jsonl: $(wc -l < "$OUT/results.jsonl") line(s); total $(( $(date +%s) - T0 ))s after the wheels"
exec 1>&3 2>&4
wait "$TEE_PID" 2>/dev/null
exit $RC
