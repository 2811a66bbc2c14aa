#!/usr/bin/env bash
# Shared body of the launch/slurm/*.sbatch job scripts: sourced with STAGE set (train_sft.py, train_rm.py,
# train_ppo.py) and the stage's flags as arguments. Runs inside the allocation on the first node.
#
#  - one task per rank, started on every node by srun (srun is the per-node launcher: slurmstepd starts the
#    ranks, so SLURM's signals reach each rank directly; rlhf_ds maps SLURM_PROCID / SLURM_STEP_NUM_TASKS /
#    SLURM_LOCALID to RANK / WORLD_SIZE / LOCAL_RANK);
#  - MASTER_ADDR = the first node of the job, MASTER_PORT derived from the job id (override by exporting them);
#  - a preflight on every node first (versions, devices, master port, shared output dir);
#  - exit code 75 (the run saved a checkpoint after --signal=USR1@... or SIGTERM) requeues the job, and the
#    requeued job resumes from that checkpoint with the same command.
set -uo pipefail
ROOT=${RLHF_DS_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$ROOT" || { echo "error: RLHF_DS_ROOT=$ROOT is not a folder: submit from the rlhf_ds checkout or export RLHF_DS_ROOT" >&2; exit 2; }
[ -f "launch/$STAGE" ] || { echo "error: $ROOT/launch/$STAGE not found: submit from the rlhf_ds checkout (sbatch launch/slurm/...) or export RLHF_DS_ROOT" >&2; exit 2; }
VENV=${RLHF_DS_VENV:-$ROOT/.venv}
# the venv first on PATH on every node (the ranks inherit it through srun --export=ALL): the same python, and the
# same ninja for DeepSpeed's JIT ops (another ninja first on PATH makes every op recompile)
[ -x "$VENV/bin/python" ] && export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
OUT=""
prev=""
for arg in "$@"; do [ "$prev" = "--output_dir" ] && OUT=$arg; prev=$arg; done

echo "[rlhf_ds] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $STAGE on $SLURM_JOB_NUM_NODES node(s) x" \
     "${SLURM_NTASKS_PER_NODE:-?} rank(s), master $MASTER_ADDR:$MASTER_PORT, $(date -Is)"
if [ "${RLHF_DS_PREFLIGHT:-1}" = 1 ]; then
  python -m rlhf_ds.preflight --slurm --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    ${OUT:+--output_dir "$OUT"} || exit $?
fi
srun --kill-on-bad-exit=1 --export=ALL python -u "launch/$STAGE" "$@"
rc=$?
if [ $rc -eq 75 ] && [ "${RLHF_DS_REQUEUE:-1}" = 1 ]; then
  echo "[rlhf_ds] checkpoint saved on a stop signal: requeueing job $SLURM_JOB_ID; it resumes from the checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit $rc
