#!/usr/bin/env bash
# The GPU check in one command, on a CUDA machine (about 6-8 minutes):
#   bash bench/gpu_check.sh [OUT.json]        (default bench/results_gpu_check.json)
# 1. the CUDA tests (tests/test_cuda.py) and the CPU-only tests' CUDA counterparts;
# 2. bench/decode.py on the GPU: bf16, int8 and int4 with bitsandbytes, int8 with PyTorch's
#    weight-only kernel (each in its own process);
# 3. bench/full_size.py: CogVLM-17B in bf16 when the GPU has the memory (>= 40 GB), else int4.
# Every step has its own time limit; a failing step is recorded, the others still run.
# Writes one JSON: {"gpu", "torch", "tests", "decode": {...}, "full_size": {...}}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results_gpu_check.json}
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: no CUDA device visible to $PY" >&2; exit 2; }

echo "== CUDA tests" >&2
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$TMP/tests.txt" 2>&1
echo $? >"$TMP/tests.rc"
tail -3 "$TMP/tests.txt" >&2

run_decode() {   # name, then bench/decode.py arguments
  local name=$1; shift
  echo "== decode $name" >&2
  timeout 150 "$PY" bench/decode.py --device cuda --repeat 3 --steps 20 "$@" \
    --json "$TMP/decode_$name.json" >"$TMP/decode_$name.txt" 2>&1 || echo "failed: see log" >>"$TMP/decode_$name.txt"
  tail -6 "$TMP/decode_$name.txt" >&2
}
run_decode bf16 --dtype bfloat16
run_decode bnb_int8 --dtype bfloat16 --quant 8 --backend bitsandbytes
run_decode bnb_int4 --dtype bfloat16 --quant 4 --backend bitsandbytes
run_decode torch_int8 --dtype bfloat16 --quant 8 --backend torch

MEM_GB=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30)")
FULL_QUANT=4
[ "$MEM_GB" -ge 40 ] && FULL_QUANT=0
echo "== full size (CogVLM-17B, quant $FULL_QUANT, GPU memory $MEM_GB GB)" >&2
timeout 200 "$PY" bench/full_size.py --device cuda --model cogvlm-chat-v1.1 --quant "$FULL_QUANT" \
  --json "$TMP/full.json" >"$TMP/full.txt" 2>&1 || echo "failed: see log" >>"$TMP/full.txt"
tail -4 "$TMP/full.txt" >&2

"$PY" - "$TMP" "$OUT" <<'EOF'
import json, sys, pathlib, torch
tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def read(name):
    p = tmp / name
    return json.loads(p.read_text()) if p.exists() else {"error": (tmp / name.replace(".json", ".txt")).read_text()[-1500:]}
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
       "tests": {"rc": int((tmp / "tests.rc").read_text()), "tail": (tmp / "tests.txt").read_text()[-800:]},
       "decode": {n: read(f"decode_{n}.json") for n in ("bf16", "bnb_int8", "bnb_int4", "torch_int8")},
       "full_size": read("full.json")}
out.write_text(json.dumps(res, indent=1))
print(f"wrote {out}")
EOF
