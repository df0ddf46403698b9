#!/usr/bin/env bash
# Score a finetuned cogvlm (LoRA checkpoint or merged model) on the captcha test split:
# acc (exact) and acc_w/o_case in percent.   MODEL=checkpoints/finetune-cogvlm-captcha bash finetune_demo/evaluate_cogvlm.sh
# The scoring is the benchmark runner's `finetune` task (evaluation/evaluate.py), model parallel
# inside each data-parallel group (MP_SIZE). With MP_SIZE=1 the same numbers, with one predictions
# line per example, come from:  python evaluation/evaluate.py --from_pretrained "$MODEL" --version base \
#   --task finetune:test --data "$DATA" --output_dir OUT
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
MODEL="${MODEL:-$REPO/checkpoints/finetune-cogvlm-captcha}"
DATA="${DATA:-$REPO/data/captcha}"
launch finetune_cogvlm_demo.py --eval_only --from_pretrained "$MODEL" --version base \
    --test_data "$DATA/test" --model_parallel_size "${MP_SIZE:-1}" --batch_size 8 "$@"
