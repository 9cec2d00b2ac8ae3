"""Exact resume: `dash-fast train` killed (SIGKILL) at a random step and resumed with `--resume auto`
ends with the same parameters, bit for bit, as an uninterrupted run; SIGTERM saves and exits cleanly.

tests/resume_loop.py runs the SIGKILL case many times with random kill points (not part of the suite).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess

import pytest
from cli_runs import (
    MAX_STEPS,
    assert_identical,
    env_with,
    kill_and_resume,
    train_cmd,
    wait_for_step,
    write_reward_module,
)


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
