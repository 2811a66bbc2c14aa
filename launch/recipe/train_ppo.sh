#!/usr/bin/env bash
# Step 3 of the recipe: the policy, trained with PPO from the SFT checkpoint against the reward model.
#   bash launch/recipe/train_ppo.sh                                   # one process
#   LAUNCHER="deepspeed --num_gpus 4" bash launch/recipe/train_ppo.sh  # 4 ranks (also: "torchrun --nproc_per_node 4")
# MODEL, SFT (default output/sft), RM (default output/rm), OUT (default output/ppo) and EXTRA_ARGS may be set.
set -euo pipefail
cd "$(dirname "$0")/../.."
LAUNCHER=${LAUNCHER:-python}
$LAUNCHER launch/train_ppo.py \
    --model_name_or_path "${MODEL:-smollm2-135m-instruct}" \
    --do_train \
    --dataset alpaca_gpt4_zh \
    --finetuning_type lora \
    --checkpoint_dir "${SFT:-output/sft}" \
    --reward_model "${RM:-output/rm}" \
    --output_dir "${OUT:-output/ppo}" \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 4 \
    --lr_scheduler_type cosine \
    --logging_steps 10 \
    --save_steps 1000 \
    --learning_rate 1e-5 \
    --num_train_epochs 1.0 \
    --fp16 ${EXTRA_ARGS:-}
