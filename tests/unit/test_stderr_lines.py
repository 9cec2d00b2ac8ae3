"""Ranks share torchrun's stderr pipe: each `dash-fast:` line must reach it whole, never spliced with another
rank's (print() writes the text and its newline in two calls, which split under load)."""

import os
import subprocess
import sys
import time

WRITER = r"""
import sys, time
from dash_fast.runtime.distributed import say
tag, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
for _ in range(30000):
    say("dash-fast: error: " + tag * 300)
"""


def test_two_processes_on_one_pipe_never_splice_lines():
    read_end, write_end = os.pipe()
    start = time.time() + 3.0  # both interpreters have imported torch by then, so the loops overlap
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # as under torchrun: every write is a system call
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, tag, str(start)], stderr=write_end, env=env)
             for tag in "ab"]
    os.close(write_end)
    with open(read_end, "rb") as f:
        lines = f.read().decode().splitlines()
    assert [p.wait() for p in procs] == [0, 0]
    whole = {"dash-fast: error: " + tag * 300 for tag in "ab"}
    assert len(lines) == 60000
    assert [line for line in lines if line not in whole][:2] == []
