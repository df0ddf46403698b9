#!/usr/bin/env bash
# LoRA finetuning of cogvlm on the captcha data (any directory works; see finetune_demo/README.md).
#   MODEL=... DATA=... SAVE=... MP_SIZE=1 NUM_GPUS=8 bash finetune_demo/finetune_cogvlm_lora.sh [extra flags]
# Extra flags go to finetune_cogvlm_demo.py (e.g. --use_qlora, --lora_vit, --resume, --train_iters 10).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
MODEL="${MODEL:-cogvlm-base-490}"
DATA="${DATA:-$REPO/data/captcha}"
SAVE="${SAVE:-$REPO/checkpoints/finetune-cogvlm-captcha}"
launch finetune_cogvlm_demo.py \
    --from_pretrained "$MODEL" --version base \
    --train_data "$DATA/train" --valid_data "$DATA/valid" --test_data "$DATA/test" \
    --save "$SAVE" --model_parallel_size "${MP_SIZE:-1}" \
    --lora_rank 10 --train_iters 800 --batch_size 4 --lr 1e-5 --warmup 0.02 \
    --save_interval 200 --eval_interval 200 --log_interval 10 "$@"
