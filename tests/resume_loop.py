"""Kill `dash-fast train` with SIGKILL at a random point N times, resume each with --resume auto, and
count the runs whose final parameters and optimizer state equal an uninterrupted run's bit for bit.

    .venv/bin/python tests/resume_loop.py [--runs 20] [--seed 0]

Not part of the test suite (minutes); tests/integration/test_resume.py runs one random kill.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile

from cli_runs import assert_identical, env_with, kill_and_resume, train_cmd, write_reward_module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args()
    folder = tempfile.mkdtemp(prefix="dash-resume-loop-")
    write_reward_module(folder)
    ref = os.path.join(folder, "reference")
    subprocess.run(train_cmd(ref), env=env_with(folder), check=True, capture_output=True)
    rng = random.Random(ns.seed)
    ok = 0
    for i in range(ns.runs):
        out = os.path.join(folder, f"run-{i}")
        step, rc = kill_and_resume(folder, out, rng, first_step=0)
        try:
            assert_identical(ref, out)
            ok += 1
            verdict = "identical"
        except AssertionError as e:
            verdict = f"DIFFERENT: {e}"
        when = f"after the step-{step} checkpoint" if step else "before the first step"
        print(f"run {i + 1:2d}: killed (rc={rc}) {when}; resumed: {verdict}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(f"{ok}/{ns.runs} resumed runs bit-identical to the uninterrupted run")
    shutil.rmtree(folder, ignore_errors=True)
    return 0 if ok == ns.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
