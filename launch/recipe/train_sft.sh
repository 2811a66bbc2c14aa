#!/usr/bin/env bash
# Step 1 of the recipe: supervised fine-tuning of the policy on alpaca_gpt4_zh, with LoRA.
#   bash launch/recipe/train_sft.sh                                   # one process
#   LAUNCHER="deepspeed --num_gpus 4" bash launch/recipe/train_sft.sh  # 4 ranks (also: "torchrun --nproc_per_node 4")
# MODEL, OUT (default output/sft) and EXTRA_ARGS (appended flags) may be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/../.."
LAUNCHER=${LAUNCHER:-python}
$LAUNCHER launch/train_sft.py \
    --model_name_or_path "${MODEL:-smollm2-135m-instruct}" \
    --do_train \
    --dataset alpaca_gpt4_zh \
    --finetuning_type lora \
    --output_dir "${OUT:-output/sft}" \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 4 \
    --lr_scheduler_type cosine \
    --logging_steps 10 \
    --save_steps 1000 \
    --learning_rate 5e-5 \
    --num_train_epochs 3.0 \
    --fp16 ${EXTRA_ARGS:-}
