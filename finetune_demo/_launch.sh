# Shared by the finetune_demo/*.sh launchers (sourced). Picks the launcher and process count:
#   NUM_GPUS (default: the GPUs nvidia-smi lists, else 2 CPU processes), LAUNCHER=deepspeed|torchrun
#   (default deepspeed when it is installed and a GPU is present, else torchrun), MASTER_PORT.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS="${NUM_GPUS:-$(nvidia-smi -L | wc -l)}"
    LAUNCHER="${LAUNCHER:-$(command -v deepspeed >/dev/null 2>&1 && echo deepspeed || echo torchrun)}"
else
    NUM_GPUS="${NUM_GPUS:-2}"
    LAUNCHER="${LAUNCHER:-torchrun}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
launch() {   # launch SCRIPT ARGS...
    local script="$REPO/finetune_demo/$1"; shift
    if [ "$LAUNCHER" = deepspeed ]; then
        deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" "$script" "$@"
    else
        torchrun --standalone --nnodes=1 --nproc-per-node="$NUM_GPUS" "$script" "$@"
    fi
}
