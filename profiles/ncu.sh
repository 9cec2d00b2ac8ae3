#!/usr/bin/env bash
# Nsight Compute on dash-fast's Triton kernels (the fused policy-gradient loss, forward and backward).
#
#   profiles/ncu.sh                               # bench/loss.py on the GPU, one problem size
#   profiles/ncu.sh dash-fast train --profile-steps 3:3 ...   # inside a training run instead
#
# Kernels are matched by name (_dash_pg_fwd_kernel, _dash_pg_bwd_kernel); the first launch of each is
# skipped (Triton autotuning / JIT) and the next few are profiled with the full section set: look at
# "GPU Speed Of Light" (memory vs compute bound), "Memory Workload Analysis" (the weight tiles should
# stream from L2/HBM once per token block) and "Warp State Statistics" (stalls on the online log-sum-exp).
set -euo pipefail
out="${NCU_OUT:-profiles/out/ncu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$(dirname "$out")"
if [[ $# -eq 0 ]]; then
    set -- python bench/loss.py --device cuda --dtype bfloat16 --quick
fi
profile_from_start=on
for arg in "$@"; do [[ "$arg" == --profile-steps* ]] && profile_from_start=off; done
ncu --kernel-name "regex:_dash_" --launch-skip 1 --launch-count "${NCU_COUNT:-4}" --set full \
    --profile-from-start "$profile_from_start" --force-overwrite -o "$out" "$@"
ncu --import "$out.ncu-rep" --page details --csv > "$out.csv"
echo "report: $out.ncu-rep (open in ncu-ui); details: $out.csv"
