"""`dash-fast train` in child processes: a tiny run with a checkpoint every step, killed and resumed, alone
(test_resume.py, resume_loop.py) or on two FSDP2 ranks under torchrun with a planted fault (test_fsdp.py,
test_checkpoint_safety.py). Each run imports its reward module from the folder it is given."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import torch
from helpers import REPO_ROOT, free_port
from safetensors.torch import load_file

from dash_fast.checkpoint import load_trainer_state

# ----------------------------------------------------------------------------- one process (test_resume.py)
MAX_STEPS = 5
ARGS = ["--seed", "1", "--max-steps", str(MAX_STEPS), "sft.steps=0", "tiny.hidden_size=32", "tiny.num_layers=1",
        "tiny.num_heads=2", "tiny.intermediate_size=64", "tiny.n_train=64", "tiny.n_test=8", "eval_examples=8",
        "prompts_per_step=4", "max_completion_tokens=8", "save_steps=1", "report_to=[]", "disable_tqdm=true",
        "learning_rate=0.01", "reward_funcs=resume_rewards:length_reward", "deterministic=true"]
REWARD_MODULE = '''
def length_reward(prompts, completions, **columns):
    """Varies within every group even for a random model, so every step moves the weights."""
    return [float(len(c) % 5) for c in completions]
'''


def write_reward_module(folder: str) -> None:
    with open(os.path.join(folder, "resume_rewards.py"), "w") as f:
        f.write(REWARD_MODULE)


def train_cmd(out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dash_fast.cli", "train", "--output-dir", out, *ARGS, *extra]


def env_with(folder: str) -> dict:
    root = str(REPO_ROOT)
    # this checkout's kernels too: an installed dash_kernels of another checkout may not match this dash_fast
    return {**os.environ, "PYTHONPATH": os.pathsep.join([folder, root, os.path.join(root, "kernels")]),
            "OMP_NUM_THREADS": "1"}


def final_state(out: str) -> tuple[dict, dict]:
    ckpt = os.path.join(out, "checkpoints", f"step-{MAX_STEPS}")
    state = load_trainer_state(ckpt)
    return load_file(os.path.join(ckpt, "model.safetensors")), state["optimizer"]["state"]


def assert_identical(a_out: str, b_out: str, note: str = "") -> None:
    (pa, oa), (pb, ob) = final_state(a_out), final_state(b_out)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"parameter {k} differs {note}"
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), f"optimizer state {i}.{k} differs {note}"


def wait_for_step(proc: subprocess.Popen, out: str, step: int, timeout: float = 240.0) -> None:
    path = os.path.join(out, "checkpoints", f"step-{step}")
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"training exited (rc={proc.returncode}) before step {step}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise TimeoutError(f"no checkpoint step-{step} after {timeout}s")
        time.sleep(0.005)


def kill_and_resume(folder: str, out: str, rng: random.Random, first_step: int = 1) -> tuple[int, int]:
    """Start a run, SIGKILL it at a random point after a random step's checkpoint (step 0: before any
    step), then resume. Returns (the step whose checkpoint was seen before the kill, the killed run's rc)."""
    env = env_with(folder)
    kill_after = rng.randint(first_step, MAX_STEPS - 1)  # 0: while it builds the model and data
    proc = subprocess.Popen(train_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after:
        wait_for_step(proc, out, kill_after)
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere in the next step, or its checkpoint write
    else:
        time.sleep(rng.uniform(1.0, 8.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    done = subprocess.run(train_cmd(out, "--resume", "auto"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return kill_after, proc.returncode


# ----------------------------------------------------------------------------- on two FSDP2 ranks (test_fsdp.py)
# the resume run above (tiny model, 4 prompts x 8 samples, a checkpoint every step) on two FSDP2 ranks; one rank's
# rows per sampling call, so one process samples the same rows with the same seeds as the two ranks
RESUME_STEPS = 4
RESUME_ARGS = ["--seed", "1", "--max-steps", str(RESUME_STEPS), "sft.steps=0", "tiny.hidden_size=32",
               "tiny.num_layers=1", "tiny.num_heads=2", "tiny.intermediate_size=64", "tiny.n_train=64", "tiny.n_test=8",
               "eval_examples=8", "prompts_per_step=4", "generation_batch_size=16", "max_completion_tokens=8",
               "save_steps=1", "keep_last_checkpoints=0", "report_to=[]", "disable_tqdm=true", "learning_rate=0.01",
               "deterministic=true",
               "reward_funcs=fault_rewards:length_reward", "parallel=fsdp2", "cpu_threads=1"]
# DASH_TEST_FAULT=RANK:STEP:kill|raise: that rank SIGKILLs itself (or raises) while scoring that step's rollout
FAULT_REWARDS = '''
import os, signal, time

def length_reward(prompts, completions, trainer_state=None, **columns):
    fault = os.environ.get("DASH_TEST_FAULT")
    if fault:
        rank, step, how = fault.split(":")
        if os.environ.get("RANK", "0") == rank and trainer_state.global_step + 1 == int(step):
            with open(os.environ["DASH_TEST_FAULT_FILE"], "w") as f:
                f.write(str(time.time()))
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"planted failure at step {step}")
    return [float(len(c) % 5) for c in completions]
'''


def write_fault_rewards(folder: str) -> None:
    with open(os.path.join(folder, "fault_rewards.py"), "w") as f:
        f.write(FAULT_REWARDS)


def dash_run(folder: str, out: str, *extra: str, ranks: int = 2, fault: str | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """`dash-fast train` on RESUME_ARGS: under torchrun with `ranks` ranks (gloo), or one process (ranks=1)."""
    root = str(REPO_ROOT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, root, os.path.join(root, "kernels")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "DASH_TEST_FAULT_FILE": os.path.join(folder, "fault-time")}
    env.pop("DASH_TEST_FAULT", None)
    if fault:
        env["DASH_TEST_FAULT"] = fault
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
              str(free_port())] if ranks > 1 else [sys.executable]
    cmd = [*launch, "-m", "dash_fast.cli", "train", "--output-dir", out, *RESUME_ARGS, *extra]
    if ranks == 1:
        cmd.remove("parallel=fsdp2")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
