#!/usr/bin/env bash
# Nsight Systems timeline of optimizer steps A..B of a dash-fast run (GPU).
#
#   profiles/nsys.sh 3:4 --model Qwen/Qwen2.5-0.5B --dataset data/math.jsonl max_steps=5
#   profiles/nsys.sh                      # steps 3:4 of the embedded default
#
# dash-fast calls cudaProfilerStart before step A and cudaProfilerStop after step B (--profile-steps),
# so nsys records only those steps (warm-up, CUDA-graph capture and evaluation stay out). The timeline
# carries dash-fast's NVTX ranges (rollout/generate, rollout/reward, train/logprob_old, train/forward,
# train/backward, optim/step, sync/weights); see profiles/README.md for how to read it.
set -euo pipefail
steps="3:4"
if [[ $# -gt 0 && "$1" =~ ^[0-9]+:[0-9]+$ ]]; then steps="$1"; shift; fi
out="${NSYS_OUT:-profiles/out/nsys-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$(dirname "$out")"
nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx \
    --cuda-graph-trace=node --force-overwrite=true -o "$out" \
    dash-fast train --profile-steps "$steps" "$@"
# Per-range wall time and the heaviest kernels, as text next to the report.
nsys stats --force-export=true --report nvtx_sum,cuda_gpu_kern_sum --format csv --output "$out" "$out.nsys-rep" >/dev/null
echo "timeline: $out.nsys-rep (open in nsys-ui); summaries: ${out}_nvtx_sum.csv, ${out}_cuda_gpu_kern_sum.csv"
