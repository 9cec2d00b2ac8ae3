#!/usr/bin/env bash
# Every GPU-side check and measurement of this repository in one go, for a session that is lent a GPU
# (e.g. the device tool: `bash profiles/gpu_session.sh`, within its 10-minute command limit; set
# QUICK=0 for the full benchmark sweeps). Written without a GPU: it has not run yet.
#
#   1. tests/test_gpu.py: Triton kernels vs the reference (fp32, bf16), CUDA-graph decode vs eager,
#      overlap on a side stream vs in order, the trainer in bf16 with the Triton loss
#   2. bench/loss.py: fused loss, Triton vs torch vs Liger (bf16)
#   3. bench/rollout.py: embedded engine (CUDA graphs) vs HF generate (bf16)
#   4. bench/e2e.py: presets dash vs grpo, overlap off / on (the 1.1x max(generate, train) bar)
#   5. profiles/nsys.sh: a timeline of two optimizer steps, when nsys is installed
#
# Results go to $OUT (default gpu-results/): each step's log and exit code, and bench/results' CSV + PNG.
# A failing step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
QUICK="${QUICK:-1}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the exit code
    local name="$1"; shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name $rc" >> "$OUT/exit_codes.txt"
    tail -n 15 "$OUT/$name.log"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" > "$OUT/versions.txt" 2>&1
if ! "$PY" -c "import dash_fast, dash_kernels" 2>/dev/null; then  # no internet: the package alone, no deps
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
fi
quick=(); [[ "$QUICK" == 1 ]] && quick=(--quick)

step test_gpu "$PY" -m pytest tests/test_gpu.py -rs -p no:cacheprovider
step bench_loss "$PY" bench/loss.py --device cuda --dtype bfloat16 ${quick[@]+"${quick[@]}"}
step bench_rollout "$PY" bench/rollout.py --device cuda --dtype bfloat16 ${quick[@]+"${quick[@]}"}
step bench_e2e "$PY" bench/e2e.py --providers dash,grpo,dash_overlap,grpo_overlap ${quick[@]+"${quick[@]}"} --results-dir "$OUT"
if command -v nsys > /dev/null; then
    NSYS_OUT="$OUT/nsys-embedded" step nsys bash profiles/nsys.sh 3:4 max_steps=5
fi
cp bench/results/loss.* bench/results/rollout.* "$OUT"/ 2>/dev/null
echo "== exit codes"; cat "$OUT/exit_codes.txt"
