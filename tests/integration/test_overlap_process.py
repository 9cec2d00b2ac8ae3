"""overlap=True on CPU with the sampler in its own process (overlap.py, sampler_process.py): it runs beside
the learner's update (in another pid, started before the update finishes: shown by a handshake, not by
timing), gives the same records and weights as the thread and in-order schedules (same bookkeeping:
rollout r+1 from theta_r), reads weights reloaded in place, re-raises its errors in the trainer, and never
outlives the trainer (training done, failed, or the trainer killed)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import TINY_TASK as TINY
from helpers import TWO, Recorder, checkout_env, make_trainer, params, records, same

from dash_fast.embedded.tiny import build_model, build_tokenizer
from dash_fast.engines.base import SamplingParams
from dash_fast.engines.torch_engine import TorchEngine
from dash_fast.overlap import OverlapScheduler, Prefetched
from dash_fast.runtime.cpus import INITIAL_CPUS, bind_process

pytestmark = [pytest.mark.skipif(len(INITIAL_CPUS) < 2, reason="the sampler process needs two CPUs"),
              pytest.mark.usefixtures("restore_affinity")]


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_the_sampler_process_runs_beside_the_update_in_another_pid(tmp_path):
    trainer = make_trainer(tmp_path, overlap=True)
    assert trainer.overlap.use_process
    seen = []

    def step_begin(batch):  # the learner's hook, inside the update before its backward: wait for the sampler
        if trainer.overlap.pending is not None:
            seen.append((trainer.overlap.pending.step, trainer.overlap.sampler_started(timeout=300)))

    trainer.learner.hooks.step_begin.append(step_begin)
    trainer.train()
    steps = [s for s, _ in seen]
    pids = {pid for _, pid in seen}
    assert steps == [2, 3, 4]  # rollouts 2..4 were being sampled while steps 1..3 trained
    assert len(pids) == 1 and None not in pids and os.getpid() not in pids  # one other process, for the run
    assert gone_within(pids.pop(), 30)  # and it is gone after train()


def test_process_schedule_gives_the_records_and_weights_of_the_thread_and_in_order_schedules(tmp_path):
    runs = {}
    for name, kw in (("process", {}), ("thread", {"cpu_sampler": "thread"}),
                     ("in_order", {"cpu_affinity": str(min(INITIAL_CPUS))})):  # one CPU: sampled at launch
        trainer = make_trainer(tmp_path / name, overlap=True, max_steps=5, **kw)
        assert trainer.overlap.use_process == (name == "process")
        assert trainer.overlap.concurrent == (name != "in_order")
        rec = Recorder(trainer)
        trainer.train()
        bind_process(set(INITIAL_CPUS))
        runs[name] = (records(trainer), params(trainer.model), rec)
    for name in ("thread", "in_order"):
        assert runs["process"][0] == runs[name][0], name
        assert same(runs["process"][1], runs[name][1]), name
    # and rollout r+1 was planned from theta_r: the weights at the start of step r
    rec = runs["process"][2]
    assert [r["rollout_lag"] for r in runs["process"][0]] == [0, 1, 1, 1, 1]
    for step in range(2, 6):
        assert same(rec.sampled_with[step - 1][1], rec.at_begin[step - 1])


def test_eval_while_a_rollout_is_pending_keeps_it_for_the_next_step(tmp_path):
    from helpers import length_reward

    from dash_fast import DashConfig, DashTrainer
    from dash_fast.embedded.tiny import make_task

    tok = build_tokenizer()
    train, test = make_task(TINY, seed=0)
    args = DashConfig(output_dir=str(tmp_path), prompts_per_step=4, group_size=4, max_completion_tokens=8,
                      max_prompt_tokens=16, report_to=[], disable_tqdm=True, learning_rate=1e-2, filter_tau=None,
                      max_steps=3, seed=1, overlap=True)
    trainer = DashTrainer(build_model(tok, TINY, seed=0), length_reward, args=args, train_dataset=train,
                          eval_dataset=test, processing_class=tok)
    try:
        trainer.train_step(1)
        trainer.state.global_step = 1
        # the optimizer step waited for rollout 2; launch it again so that it is still in flight at eval (as
        # after a step with no update: no-signal or skipped batches)
        trainer.sampler.load_state_dict(trainer.overlap.discard().sampler_before)
        trainer.collector._prefetch(2, trainer.learner.weights_version)
        assert trainer.overlap.pending.step == 2 and trainer.overlap.pending.rollout is None
        assert trainer.evaluate(max_examples=4)["examples"] == 4
        received = trainer.overlap.pending.rollout
        assert received is not None  # received, not dropped
        assert trainer.collector.rollout_for(2, trainer.learner.weights_version).rollout is received  # step 2's
    finally:
        trainer.overlap.close()


def scheduler_and_model():
    tok = build_tokenizer()
    model = build_model(tok, TINY, seed=0)
    engine = TorchEngine(model, tok.pad_token_id)
    sched = OverlapScheduler(torch.device("cpu"), concurrent=True, cpus=TWO, engine=engine)
    assert sched.use_process
    return sched, model, engine, tok


def plan_of(tok, seed: int = 3):
    prompts = [tok("1+2=")["input_ids"], tok("3+4=")["input_ids"]]
    return [(prompts, SamplingParams(max_new_tokens=6, seed=seed))]


def test_the_sampler_process_reads_weights_reloaded_in_place_and_reraises_its_errors():
    sched, model, engine, tok = scheduler_and_model()
    plan = plan_of(tok)
    try:
        sched.launch(Prefetched(1, [0], 0, {}, 0), lambda: None, plan)
        first = sched.take(1).rollout
        assert torch.equal(first.completion_ids, engine.generate(*plan[0]).completion_ids)
        other = build_model(tok, TINY, seed=1)
        model.load_state_dict(other.state_dict())  # as resume does: in place, into the shared storages
        sched.launch(Prefetched(2, [0], 0, {}, 1), lambda: None, plan)
        second = sched.take(2).rollout
        assert torch.equal(second.completion_ids, engine.generate(*plan[0]).completion_ids)
        assert not torch.equal(second.sampling_logps, first.sampling_logps)  # the new weights, not a copy

        bad = [([[10**6]], SamplingParams(max_new_tokens=2, seed=1))]  # a token id past the vocabulary
        sched.launch(Prefetched(3, [0], 0, {}, 1), lambda: None, bad)
        with pytest.raises(IndexError):
            sched.take(3)
        assert sched.pending is None
        sched.launch(Prefetched(4, [0], 0, {}, 1), lambda: None, plan)  # the process survived its error
        assert torch.equal(sched.take(4).rollout.completion_ids, second.completion_ids)

        pid = sched.process.pid
        sched.launch(Prefetched(5, [0], 0, {}, 1), lambda: None, plan)
        os.kill(pid, signal.SIGKILL)  # the sampler dies: the trainer is told, not left waiting
        with pytest.raises(RuntimeError, match=f"sampler process \\(pid {pid}\\) exited"):
            sched.take(5)
    finally:
        sched.close()


def test_no_sampler_process_outlives_a_failed_run(tmp_path):
    from dash_fast.rewards import RewardError

    calls = []

    def failing_reward(completions, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("reward service down")
        return [float(len(c) % 5) for c in completions]

    trainer = make_trainer(tmp_path, overlap=True, max_steps=5)
    trainer.rewards.funcs = [failing_reward]
    pids = []
    launch = trainer.overlap.launch

    def launch_(*a, **k):
        launch(*a, **k)
        pids.append(trainer.overlap.process.pid)

    trainer.overlap.launch = launch_
    with pytest.raises((RuntimeError, RewardError)):
        trainer.train()
    assert pids and gone_within(pids[-1], 30)
    assert trainer.overlap.process is None


def test_the_sampler_process_dies_with_a_killed_trainer(tmp_path):
    script = textwrap.dedent("""
        import os, signal, torch
        from dash_fast.overlap import OverlapScheduler, Prefetched
        from dash_fast.engines.base import SamplingParams
        from dash_fast.engines.torch_engine import TorchEngine
        from dash_fast.embedded.tiny import build_model, build_tokenizer
        from helpers import TINY_TASK as TINY

        tok = build_tokenizer()
        engine = TorchEngine(build_model(tok, TINY, seed=0), tok.pad_token_id)
        sched = OverlapScheduler(torch.device("cpu"), concurrent=True, cpus={0, 1}, engine=engine)
        sched.launch(Prefetched(1, [0], 0, {}, 0), lambda: None, [([[1, 2]], SamplingParams(max_new_tokens=2))])
        sched.take(1)
        print(sched.process.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs
    """)  # no __main__ guard, as in a user's script: the child must not re-run it
    path = tmp_path / "train_script.py"
    path.write_text(script)
    env = checkout_env()
    # output to files, not pipes: the sampler inherits them, and reading a pipe to its end would wait for it
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        code = subprocess.run([sys.executable, str(path)], stdout=out, stderr=err, env=env, timeout=300).returncode
    assert code == -signal.SIGKILL, (tmp_path / "err.txt").read_text()[-2000:]
    pid = int((tmp_path / "out.txt").read_text().split()[0])
    assert gone_within(pid, 30)
