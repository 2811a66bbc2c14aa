#!/usr/bin/env bash
# The built-in default run: the whole recipe (SFT -> reward model -> PPO -> report) on the default real pretrained
# model and the shipped Chinese data, sized to about 20 minutes on a 2-core CPU machine. Flags are passed on to
# launch/run_recipe.py (e.g. --model qwen2.5-coder-0.5b-instruct, --launcher "deepspeed --num_gpus 2").
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python launch/run_recipe.py --output_dir "${OUT:-output/recipe}" "$@"
