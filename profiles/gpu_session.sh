#!/usr/bin/env bash
# The GPU session in one command: checks + measurements, one summary table on stdout and in $OUT.
#
#   bash profiles/gpu_session.sh                 # on a CUDA GPU (QUICK=1: the summary only, ~5 min)
#   QUICK=0 bash profiles/gpu_session.sh         # + the full benchmark sweeps (longer than one 10-min command)
#   DRY_RUN=1 bash profiles/gpu_session.sh       # CPU: every step at toy shapes, Triton in its interpreter
#
# Steps (profiles/gpu_session.py has the details): Triton fwd/bwd vs the float64 reference (fp32, bf16),
# both backwards vs Liger and torch at the Qwen2.5-0.5B head, CUDA-graph decode vs eager, overlap vs in
# order, bf16 trainer Triton loss vs torch loss, deterministic reruns, grouped-query attention on a fused
# SDPA kernel, what fp32 masters cost, the memory plan vs the CUDA peak; then tests/ops/test_gpu.py.
#
# $OUT (the device tool's output folder; default gpu-results/) gets at most 7 flat files: summary.md,
# summary.json, session.log, test_gpu.log, nvidia-smi.txt, versions.txt, exit_codes.txt. Liger is not in
# the GPU image: carry its wheel in .whl/ (see profiles/README.md), or its rows say "not importable".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
QUICK="${QUICK:-1}"
DRY_RUN="${DRY_RUN:-0}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
: > "$OUT/exit_codes.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$DRY_RUN" == 1 ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    dry=(--dry-run)
else
    dry=()
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels (liger-kernel): no index on the machine
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
            export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
try:
    import liger_kernel; print('liger_kernel', getattr(liger_kernel, '__version__', 'installed'))
except Exception as e: print('liger_kernel missing:', e)" > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

BUDGET="${BUDGET:-560}"  # seconds for everything below: one device-tool command is at most 600
timeout $((BUDGET - 150 - SECONDS)) "$PY" profiles/gpu_session.py --out "$OUT" ${dry[@]+"${dry[@]}"} 2>&1 | tee "$OUT/session.log"
echo "gpu_session.py ${PIPESTATUS[0]}" >> "$OUT/exit_codes.txt"

if [[ "$DRY_RUN" != 1 ]]; then  # the pytest view of the same ground (skipped without CUDA)
    left=$((BUDGET - SECONDS))  # what the summary left (>= ~150 s)
    timeout "$left" "$PY" -m pytest tests/ops/test_gpu.py -q -rs -p no:cacheprovider > "$OUT/test_gpu.log" 2>&1
    echo "test_gpu $?" >> "$OUT/exit_codes.txt"
    tail -n 3 "$OUT/test_gpu.log"
fi
if [[ "$QUICK" == 0 && "$DRY_RUN" != 1 ]]; then  # the sweeps: a second command's worth
    "$PY" bench/loss.py --device cuda --dtype bfloat16 >> "$OUT/session.log" 2>&1; echo "bench_loss $?" >> "$OUT/exit_codes.txt"
    "$PY" bench/rollout.py --device cuda --dtype bfloat16 >> "$OUT/session.log" 2>&1; echo "bench_rollout $?" >> "$OUT/exit_codes.txt"
    "$PY" bench/e2e.py --providers dash,grpo,dash_overlap,grpo_overlap >> "$OUT/session.log" 2>&1
    echo "bench_e2e $?" >> "$OUT/exit_codes.txt"
fi
echo "== exit codes"; cat "$OUT/exit_codes.txt"
! grep -qv " 0$" "$OUT/exit_codes.txt"
