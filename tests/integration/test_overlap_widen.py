"""overlap=True on CPU, sampler process: once the sampler has sent the pending rollout back, the learner
takes its cores too (overlap.py, OverlapScheduler.between_micro_batches), between micro-batches only, and
gives them back before the next rollout is launched. Shown with the sampler held back by the test (its
plan is sent only at the step's first micro-batch, and its result awaited before the second), so the
thread count at every micro-batch is known, not a matter of timing. The records and weights equal those
of the unwidened overlap run and of the in-order schedule within float tolerance (only the learner's
thread count changes)."""

import math
import os

import pytest
import torch
from helpers import TWO, Recorder, make_trainer, params, records

from dash_fast.runtime.cpus import INITIAL_CPUS, bind_process

pytestmark = [pytest.mark.skipif(len(INITIAL_CPUS) < 2, reason="the sampler process needs two CPUs"),
              pytest.mark.usefixtures("restore_affinity")]
# records and weights: the learner's sums may group differently at another thread count (at this shape they
# are equal bit for bit: its ops are below torch's parallel grain size, so they run on one thread either way)
RTOL, ATOL = 1e-5, 1e-6


def thread_cpus(pid: int | str = "self") -> set[frozenset[int]]:
    """The distinct Cpus_allowed_list of every thread of `pid` (OpenMP workers included)."""
    from dash_fast.runtime.cpus import parse_cpus

    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
        except (FileNotFoundError, ProcessLookupError):  # a thread that just exited
            continue
        out.add(frozenset(parse_cpus(line.split(":", 1)[1].strip())))
    return out


def hold_the_sampler(trainer, seen: list):
    """Each launched plan reaches the sampler process only at the step's first micro-batch, and its rollout
    is awaited before the second; `seen` gets (step, kind, in_flight, threads, cpus of every thread, those of
    the sampler's threads) at each micro-batch (after the scheduler's check) and after each launch."""
    sched = trainer.overlap
    process = sched.process
    submit, check, launch = process.submit, sched.between_micro_batches, sched.launch
    held, checks = [], []

    def state(kind):
        torch.ones(1 << 20).sum()  # a parallel region, so that OpenMP's workers for this thread count exist
        step = sched.pending.step if sched.pending is not None else None
        seen.append((step, kind, sched._in_flight, torch.get_num_threads(), thread_cpus(), thread_cpus(process.pid)))

    def submit_(step, plan):
        held.append((step, plan))

    def launch_(*a, **k):
        launch(*a, **k)
        checks.clear()
        state("launched")

    def check_():
        checks.append(1)
        if len(checks) == 2 and sched._in_flight:  # the rollout is in: the check below must widen
            sched._receive(timeout=300)
        check()
        state("micro")
        if held:  # seen in flight at this first micro-batch: only now does the sampler get it
            submit(*held.pop())

    process.submit, sched.launch = submit_, launch_
    hooks = trainer.learner.hooks.before_micro_batch  # the learner's hook: the scheduler's check, wrapped
    hooks[hooks.index(check)] = check_
    return sched


@pytest.mark.parametrize("bind", [False, True])
def test_the_learner_widens_only_once_the_sampler_is_done_and_narrows_at_the_next_launch(tmp_path, bind):
    trainer = make_trainer(tmp_path, overlap=True, max_steps=4, micro_batch_tokens=64, bind_cpus=bind,
                           cpu_affinity=",".join(map(str, sorted(TWO))))
    learner, sampler = trainer.overlap.cpu_split
    assert trainer.overlap.widen and len(learner) == len(sampler) == 1
    seen = []
    sched = hold_the_sampler(trainer, seen)
    assert sched.process.wait_ready(timeout=300)
    trainer.train()
    narrow = (len(learner), {frozenset(learner)} if bind else {frozenset(TWO)})
    wide = (len(TWO), {frozenset(TWO)})
    launched = [s for s in seen if s[1] == "launched"]
    assert [s[0] for s in launched] == [2, 3, 4]
    for step, kind, in_flight, threads, cpus, _ in seen:
        if kind == "launched" or in_flight:  # the sampler may be reading theta: the learner keeps its share
            assert (threads, cpus) == narrow, (step, kind, in_flight)
        else:  # its rollout is in: the learner has every core
            assert (threads, cpus) == wide, (step, kind, in_flight)
    micro = [s for s in seen if s[1] == "micro"]
    assert any(s[2] for s in micro) and sum(not s[2] for s in micro) > len(micro) // 2  # both states seen
    for s in seen:  # the sampler process's threads: on its own core with bind_cpus, else on both throughout
        assert s[5] == ({frozenset(sampler)} if bind else {frozenset(TWO)}), s[:3]


def close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)
    return a == b


def test_widened_records_and_weights_equal_the_unwidened_and_in_order_ones(tmp_path):
    runs = {}
    for name, kw in (("widened", {}), ("narrow", {}), ("in_order", {"cpu_affinity": str(min(INITIAL_CPUS))})):
        trainer = make_trainer(tmp_path / name, overlap=True, max_steps=5, micro_batch_tokens=64, **kw)
        if name == "narrow":
            trainer.overlap.widen = False
        seen = []
        if trainer.overlap.use_process:
            hold_the_sampler(trainer, seen)
        rec = Recorder(trainer)
        trainer.train()
        bind_process(set(INITIAL_CPUS))
        runs[name] = (records(trainer), params(trainer.model), rec)
        threads = {s[3] for s in seen if s[1] == "micro"}
        assert threads == ({1, 2} if name == "widened" else {1} if name == "narrow" else set()), name
    base_records, base_weights, _ = runs["widened"]
    for name in ("narrow", "in_order"):
        recs, weights, _ = runs[name]
        assert len(recs) == len(base_records) == 5
        for r, b in zip(recs, base_records):
            assert r.keys() == b.keys() and all(close(r[k], b[k]) for k in r), (name, r, b)
        assert all(torch.allclose(weights[k], base_weights[k], rtol=RTOL, atol=ATOL) for k in weights), name
        # same rollouts: the very completions each step trained on
        for step, (rollout, _) in runs[name][2].used.items():
            assert torch.equal(rollout.completion_ids, runs["widened"][2].used[step][0].completion_ids), (name, step)


def test_the_thread_sampler_is_never_widened(tmp_path):
    trainer = make_trainer(tmp_path, overlap=True, max_steps=3, micro_batch_tokens=64, cpu_sampler="thread")
    assert not trainer.overlap.widen
    threads = []
    trainer.learner.hooks.before_micro_batch.append(lambda: threads.append(torch.get_num_threads()))  # after the check
    trainer.train()
    assert threads and set(threads) == {len(trainer.overlap.cpu_split[0])}
