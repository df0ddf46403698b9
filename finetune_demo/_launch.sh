# Shared by the finetune_demo/*.sh launchers (sourced). Picks the launcher and process count:
#   NUM_GPUS (default: the GPUs nvidia-smi lists, else 2 CPU processes), LAUNCHER=deepspeed|torchrun
#   (default deepspeed when it is installed and a GPU is present, else torchrun), MASTER_PORT,
#   PYTHON (default: python3 on PATH, i.e. the active virtual environment's).
# Several nodes (finetune_demo/README.md): data parallel across nodes, model parallel (MP_SIZE)
# inside each node, so MP_SIZE must divide the processes per node.
#   HOSTFILE=path (DeepSpeed's `host slots=N` lines; the original's HOST_FILE_PATH too, with
#     NUM_WORKERS hosts of it and NUM_GPUS_PER_WORKER processes each): DeepSpeed's launcher over
#     those hosts by ssh (pdsh) from one node; with NODE_RANK set, the same command on every host
#     instead (DeepSpeed's --no_ssh). MASTER_ADDR defaults to the first host.
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (or RDZV_ENDPOINT=host:port): torchrun with c10d
#     rendezvous; run the same command on every node (NUM_GPUS processes each).
#   RDZV_TIMEOUT (600): seconds a node waits for the others to join, both launchers;
#   COGVLM_DIST_TIMEOUT (600): seconds a collective waits for a peer. On CPUs (gloo), LOCAL_ADDR /
#   GLOO_SOCKET_IFNAME default to the address and interface this node reaches MASTER_ADDR from.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NUM_GPUS="${NUM_GPUS:-$(nvidia-smi -L | wc -l)}"
    LAUNCHER="${LAUNCHER:-$("$PYTHON" -c 'import deepspeed' >/dev/null 2>&1 && echo deepspeed || echo torchrun)}"
    GPU=1
else
    NUM_GPUS="${NUM_GPUS:-2}"
    LAUNCHER="${LAUNCHER:-torchrun}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    GPU=
fi
HOSTFILE="${HOSTFILE:-${HOST_FILE_PATH:-}}"
export RDZV_TIMEOUT="${RDZV_TIMEOUT:-600}"

fail() { echo "error: $*" >&2; exit 2; }
whole() { [[ "$2" =~ ^[0-9]+$ ]] || fail "$1=$2: expected a whole number"; }   # whole NAME VALUE
for var in NUM_GPUS RDZV_TIMEOUT MP_SIZE COGVLM_DIST_TIMEOUT NNODES NUM_WORKERS NUM_GPUS_PER_WORKER; do
    [ -z "${!var:-}" ] || whole "$var" "${!var}"
done

# The processes per node of each host the hostfile gives (NUM_WORKERS hosts, NUM_GPUS_PER_WORKER each).
hostfile_slots() {
    [ -f "$HOSTFILE" ] || fail "HOSTFILE=$HOSTFILE: no such file (DeepSpeed's format: one \`host slots=N\` per line)"
    local n=0 line host slots
    while read -r line; do
        line="${line%%#*}"; [ -n "${line// }" ] || continue
        host="${line%% *}"; slots="$(sed -n 's/.*slots=\([0-9][0-9]*\).*/\1/p' <<<"$line")"
        [ -n "$slots" ] || fail "HOSTFILE=$HOSTFILE: '$line' has no slots=N"
        n=$((n + 1)); [ -z "${NUM_WORKERS:-}" ] || [ "$n" -le "$NUM_WORKERS" ] || break
        echo "$host ${NUM_GPUS_PER_WORKER:-$slots}"
    done < "$HOSTFILE"
}

check_mp() {   # check_mp PROCS_PER_NODE
    local mp="${MP_SIZE:-1}"
    [ "$mp" -ge 1 ] && [ $(("$1" % mp)) -eq 0 ] || fail "MP_SIZE=$mp must divide the $1 process(es) per node" \
        "(model parallel stays inside a node, data parallel spans the nodes)"
}

# CPU runs (gloo): the address and interface this node reaches MASTER_ADDR from, unless given.
gloo_address() {
    [ -z "$GPU" ] || return 0
    LOCAL_ADDR="${LOCAL_ADDR:-$("$PYTHON" -c 'import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((sys.argv[1], 9)); print(s.getsockname()[0])' "$1" 2>/dev/null)}" ||
        fail "MASTER_ADDR=$1: not reachable from this node (unknown host or no route)"
    if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && command -v ip >/dev/null 2>&1; then
        local dev; dev="$(ip -o -4 addr show 2>/dev/null | awk -v a="$LOCAL_ADDR" '{split($4, p, "/")} p[1] == a {print $2; exit}')"
        [ -z "$dev" ] || export GLOO_SOCKET_IFNAME="$dev"
    fi
}

launch_deepspeed() {   # launch_deepspeed SCRIPT ARGS...
    local ds=("$PYTHON" -m deepspeed.launcher.runner --master_port "${MASTER_PORT:-29500}")
    if [ -n "$HOSTFILE" ]; then
        local hosts; hosts="$(hostfile_slots)" || exit $?
        [ -n "$hosts" ] || fail "HOSTFILE=$HOSTFILE lists no host"
        while read -r _ slots; do check_mp "$slots"; done <<<"$hosts"
        MASTER_ADDR="${MASTER_ADDR:-$(head -n 1 <<<"$hosts" | cut -d' ' -f1)}"
        ds+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
        [ -z "${NUM_WORKERS:-}" ] || ds+=(--num_nodes "$NUM_WORKERS")
        [ -z "${NUM_GPUS_PER_WORKER:-}" ] || ds+=(--num_gpus "$NUM_GPUS_PER_WORKER")
        [ -z "${NODE_RANK:-}" ] || ds+=(--no_ssh --node_rank "$NODE_RANK")
        echo "starting $(wc -l <<<"$hosts") node(s) of $HOSTFILE with deepspeed (rendezvous $MASTER_ADDR, RDZV_TIMEOUT=$RDZV_TIMEOUT s)" >&2
    else
        check_mp "$NUM_GPUS"
        ds+=(--num_gpus "$NUM_GPUS")
    fi
    [ -z "${MASTER_ADDR:-}" ] || gloo_address "$MASTER_ADDR"
    "${ds[@]}" "$@"
}

launch_torchrun() {   # launch_torchrun SCRIPT ARGS...
    check_mp "$NUM_GPUS"
    if [ "${NNODES:-1}" = 1 ]; then
        torchrun_agent --standalone --nnodes=1 --nproc-per-node="$NUM_GPUS" "$@"
        return
    fi
    [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] ||
        fail "NNODES=$NNODES: set NODE_RANK to 0 on the node at MASTER_ADDR, 1..$((NNODES - 1)) on the others (got '${NODE_RANK:-}')"
    [ -n "${RDZV_ENDPOINT:-}${MASTER_ADDR:-}" ] || fail "NNODES=$NNODES: set MASTER_ADDR (node 0's address) or RDZV_ENDPOINT=host:port"
    local endpoint="${RDZV_ENDPOINT:-$MASTER_ADDR:${MASTER_PORT:-29500}}"
    gloo_address "${endpoint%:*}"
    local tr=(--nnodes="$NNODES" --nproc-per-node="$NUM_GPUS" --rdzv-backend=c10d --rdzv-endpoint="$endpoint"
              --rdzv-id="${RDZV_ID:-cogvlm-finetune}" --max-restarts=0
              --rdzv-conf="is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0),join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_TIMEOUT")
    [ -z "${LOCAL_ADDR:-}" ] || tr+=(--local-addr="$LOCAL_ADDR")
    echo "node $NODE_RANK of $NNODES: rendezvous at $endpoint (RDZV_TIMEOUT=$RDZV_TIMEOUT s)" >&2
    torchrun_agent "${tr[@]}" "$@"
}

# torchrun (utils/training/nodes.py: the roll call of the nodes first, failures as one line).
# c10d's C++ warnings (a stack trace when a lost node's store is gone) would bury that line; the
# workers inherit the level (TORCH_CPP_LOG_LEVEL=WARNING keeps them).
torchrun_agent() {   # torchrun_agent TORCHRUN_ARGS... SCRIPT ARGS...
    NODE_RANK="${NODE_RANK:-0}" TORCH_CPP_LOG_LEVEL="${TORCH_CPP_LOG_LEVEL:-ERROR}" "$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1])
from utils.training.nodes import torchrun_nodes; sys.exit(torchrun_nodes(sys.argv[2:]))' "$REPO" "$@"
}

launch() {   # launch SCRIPT ARGS...
    local script="$REPO/finetune_demo/$1"; shift
    # Model, data and --save are checked in seconds, in one process, before any rank starts.
    "$PYTHON" "$script" "$@" --preflight || exit $?
    if [ -n "$HOSTFILE" ] || [ "$LAUNCHER" = deepspeed ]; then
        echo "starting with deepspeed; a first start can take a minute (DeepSpeed builds its ops once)" >&2
        launch_deepspeed "$script" "$@"
    else
        echo "starting $NUM_GPUS process(es) per node with torchrun" >&2
        launch_torchrun "$script" "$@"
    fi
}
