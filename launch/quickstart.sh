#!/usr/bin/env bash
# The built-in default run, on this machine or any other: train a reward model on the shipped English comparison
# pairs with the default real pretrained model (SmolLM2-135M-Instruct, installed from PyPI), evaluate it on a
# held-out 10 %, and print its accuracy beside the "longer answer wins" baseline.
#   bash launch/quickstart.sh                 # output in output/quickstart/
#   OUT=/tmp/q bash launch/quickstart.sh --max_samples 200   # extra flags go to train_rm.py
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/quickstart}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

python launch/train_rm.py \
  --model_name_or_path smollm2-135m-instruct \
  --do_train --do_eval --val_size 0.1 \
  --dataset comparison_gpt4_en \
  --finetuning_type lora \
  --output_dir "$OUT/rm" --overwrite_output_dir \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 2 \
  --learning_rate 2e-4 --lr_scheduler_type cosine --warmup_ratio 0.05 \
  --num_train_epochs 1 --logging_steps 10 --save_steps 0 \
  --max_length 384 --bf16 --plot_loss "$@"

python - "$OUT/rm" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
r = json.loads((out / "eval_results.json").read_text())
t = json.loads((out / "train_results.json").read_text())
print(f"\nreward model: {out}")
print(f"  eval accuracy            {r['eval_accuracy']:.3f}  on {r['eval_samples']} held-out pairs")
print(f"  length-only baseline     {r['eval_length_baseline_accuracy']:.3f}  (the longer answer wins)")
print(f"  eval loss                {r['eval_loss']:.3f}")
print(f"  training time            {t['train_runtime'] / 60:.1f} min")
print(f"  loss curve               {out / 'training_loss.png'}")
PY
