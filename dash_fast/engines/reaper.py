"""Stops vLLM's engine processes when the trainer that started them dies (vllm_process.py).

vLLM's engine core does not watch its parent: after a SIGKILL of the trainer (or a SIGTERM before the
trainer's handler is installed) it runs on, reparented.
Run as a script, not imported: a child of the trainer that marks nothing and shares no state with it. It
waits until the trainer is gone (its parent pid changes; or the trainer closes the pipe on its stdin without
saying "close"), then SIGKILLs every process whose environment carries the engine's marker (vLLM's
processes are spawned, so they are exec'd with the environment the trainer set for them; a reused pid does
not carry it), lets the multiprocessing resource tracker exit once nothing holds its pipe (it then cleans
up what the engine left), kills it if it has not after a few seconds, and removes the weight staging dir.
It ignores SIGINT / SIGTERM / SIGHUP: Ctrl-C or a hang-up reach the whole process group, and the trainer
decides what happens (it saves and closes the engine, or dies, and then this cleans up).

    python reaper.py <marker NAME=VALUE> <staging dir>
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time


def processes_with(marker: bytes) -> list[int]:
    """Live processes, other than this one, whose initial environment holds `marker` (b'NAME=VALUE')."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if int(pid) != os.getpid() and marker in env and state != b"Z":
            found.append(int(pid))
    return found


def is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def reap(marker: bytes, stage: str, grace: float = 5.0) -> None:
    """SIGKILL the marked processes (the resource tracker last, after `grace` seconds to exit by itself)."""
    kill([p for p in processes_with(marker) if not is_resource_tracker(p)])
    deadline = time.monotonic() + grace
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    kill(processes_with(marker))
    shutil.rmtree(stage, ignore_errors=True)


def main(argv: list[str]) -> None:
    marker, stage = argv[1].encode(), argv[2]
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    trainer = os.getppid()
    while os.getppid() == trainer:
        ready, _, _ = select.select([sys.stdin], [], [], 0.5)
        if ready:
            line = sys.stdin.readline()
            if line.strip() == "close":  # the engine was shut down by the trainer: nothing to do
                return
            if not line:  # end of file: the trainer is gone
                break
    reap(marker, stage)


if __name__ == "__main__":
    main(sys.argv)
