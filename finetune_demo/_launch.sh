# Shared by the finetune_demo/*.sh launchers (sourced). Picks the launcher and process count:
#   NUM_GPUS (default: the GPUs nvidia-smi lists, else 2 CPU processes), LAUNCHER=deepspeed|torchrun
#   (default deepspeed when it is installed and a GPU is present, else torchrun), MASTER_PORT,
#   PYTHON (default: python3 on PATH, i.e. the active virtual environment's).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS="${NUM_GPUS:-$(nvidia-smi -L | wc -l)}"
    LAUNCHER="${LAUNCHER:-$("$PYTHON" -c 'import deepspeed' >/dev/null 2>&1 && echo deepspeed || echo torchrun)}"
else
    NUM_GPUS="${NUM_GPUS:-2}"
    LAUNCHER="${LAUNCHER:-torchrun}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
launch() {   # launch SCRIPT ARGS...
    local script="$REPO/finetune_demo/$1"; shift
    # Model, data and --save are checked in seconds, in one process, before any rank starts.
    "$PYTHON" "$script" "$@" --preflight || exit $?
    echo "starting $NUM_GPUS process(es) with $LAUNCHER; a first start can take a minute (DeepSpeed builds its ops once)" >&2
    if [ "$LAUNCHER" = deepspeed ]; then
        "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" "$script" "$@"
    else
        "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NUM_GPUS" "$script" "$@"
    fi
}
