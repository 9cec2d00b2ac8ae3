"""Exact resume: `dash-fast train` killed (SIGKILL) at a random step and resumed with `--resume auto`
ends with the same parameters, bit for bit, as an uninterrupted run; SIGTERM saves and exits cleanly.

tests/resume_loop.py runs the SIGKILL case many times with random kill points (not part of the suite).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dash_fast.checkpoint import load_trainer_state

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
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("resume"))
    write_reward_module(folder)
    out = os.path.join(folder, "reference")
    done = subprocess.run(train_cmd(out), env=env_with(folder), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, out


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference):
    folder, ref = reference
    seed = random.randrange(10**6)
    out = os.path.join(folder, "killed")
    step, rc = kill_and_resume(folder, out, random.Random(seed))
    assert rc == -signal.SIGKILL
    assert_identical(ref, out, f"(kill seed {seed}, after step {step})")


def test_sigterm_saves_at_the_next_safe_point_and_exits_cleanly(reference):
    folder, ref = reference
    out = os.path.join(folder, "terminated")
    env = env_with(folder)
    proc = subprocess.Popen(train_cmd(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, out, 1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    steps = sorted(int(n.split("-")[1]) for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("step-"))
    if steps[-1] < MAX_STEPS:  # the signal landed before the last step: it stopped early and said so
        assert "continue with --resume auto" in stdout
    done = subprocess.run(train_cmd(out, "--resume", "auto"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_identical(ref, out)


def test_sigint_in_process_stops_after_the_step_with_a_checkpoint(tmp_path):
    """Ctrl-C takes the same path as SIGTERM: finish the step, checkpoint, return normally."""
    from transformers import TrainerCallback

    from dash_fast import DashConfig, DashTrainer
    from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    tiny = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_train=32, n_test=4)
    tok = build_tokenizer()
    train, _ = make_task(tiny, seed=0)
    args = DashConfig(output_dir=str(tmp_path), max_steps=50, prompts_per_step=2, max_completion_tokens=6,
                      report_to=[], disable_tqdm=True)
    trainer = DashTrainer(build_model(tok, tiny), "exact_answer", args=args, train_dataset=train,
                          processing_class=tok, callbacks=[Interrupt()])
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    summary = trainer.train()
    assert summary["steps"] == 2 and not summary["finished"]
    assert os.listdir(tmp_path / "checkpoints") == ["step-2"]
    assert signal.getsignal(signal.SIGINT) == before  # the handler is put back
