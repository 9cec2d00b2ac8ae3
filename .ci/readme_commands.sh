#!/usr/bin/env bash
# The README's commands as a new user runs them: a fresh venv set up exactly as the README's first command
# does, then every `dash-fast ...` line of README.md shrunk onto local stand-ins (tests/readme_commands.py),
# plus the two lines issue 13 named: `dash-fast train --max-steps 3 --beta 0.04` and the GSM8K sample
# through --dataset. Each must exit 0 with plain-number metrics. Usage: bash .ci/readme_commands.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d /tmp/readme-commands.XXXXXX)}"
venv="$work/venv"
python3 -m venv "$venv" && "$venv/bin/pip" install -q torch==2.13.0 && "$venv/bin/pip" install -q -c constraints.txt -e .
export OMP_NUM_THREADS=1 PATH="$venv/bin:$PATH"
"$venv/bin/python" tests/readme_commands.py --workdir "$work/readme"
cd "$work"
dash-fast train --max-steps 3 --beta 0.04 --output-dir beta sft.steps=20 tiny.n_train=500 eval_examples=50
"$venv/bin/python" -c "
import json, sys; sys.path.insert(0, '$OLDPWD/tests')
from readme_commands import build_standin_model, plain_numbers
from pathlib import Path
build_standin_model(Path('standin'))
rows = [json.loads(l) for l in open('beta/metrics.jsonl')]
assert [r['step'] for r in rows] == [1, 2, 3] and not any(plain_numbers(r) for r in rows), rows
print('beta run: kl per step', [round(r['kl'], 6) for r in rows])"
dash-fast train --model standin --dataset "$OLDPWD/tests/data/gsm8k_sample.jsonl" --max-steps 2 --output-dir gsm8k \
    prompts_per_step=4 max_completion_tokens=32
"$venv/bin/python" -c "
import json, sys; sys.path.insert(0, '$OLDPWD/tests')
from readme_commands import plain_numbers
rows = [json.loads(l) for l in open('gsm8k/metrics.jsonl')]
assert [r['step'] for r in rows] == [1, 2] and not any(plain_numbers(r) for r in rows), rows
assert json.load(open('gsm8k/config.json'))['dataset_format'] == 'auto'
print('gsm8k run: rewards/math_reward per step', [r['rewards/math_reward'] for r in rows])"
echo "readme_commands: all passed ($work)"
