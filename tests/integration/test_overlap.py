"""The overlap schedule's bookkeeping on CPU (sequential, same results as the CUDA-stream schedule):
rollout r+1 is sampled from theta_r (the weights before step r's optimizer step), its sampler log-probs
are the old log-probs, prompts are consumed in the same order as without overlap, and a checkpoint taken
with a rollout pending neither loses nor repeats prompts."""

import os
import shutil
import threading

import pytest
import torch
from helpers import TINY_TASK as TINY
from helpers import Recorder, make_trainer, params, same

from dash_fast.checkpoint import load_trainer_state
from dash_fast.embedded.tiny import build_model, build_tokenizer
from dash_fast.engines.torch_engine import TorchEngine
from dash_fast.overlap import OverlapScheduler, Prefetched
from dash_fast.runtime.cpus import INITIAL_CPUS, bind_process, parse_cpus, split_cpus


def test_with_overlap_rollout_r_plus_1_is_sampled_from_the_weights_before_step_r(tmp_path):
    trainer = make_trainer(tmp_path, overlap=True)
    rec = Recorder(trainer)
    trainer.train()
    assert [r["rollout_lag"] for r in trainer.state.log_history] == [0, 1, 1, 1]
    seeds = [trainer.collector.sampling_params(s).seed for s in range(1, 5)]
    assert [seed for seed, _ in rec.sampled_with] == seeds  # one generate per step, in step order
    for step in range(2, 5):
        _, weights = rec.sampled_with[step - 1]
        assert same(weights, rec.at_begin[step - 1])  # theta_{r}: before step r's optimizer step ...
        assert not same(weights, rec.at_begin[step])  # ... not the weights step r+1 trains
    # regenerating from a snapshot of theta_r with step r+1's seed gives exactly the rollout step r+1 used
    snapshot = build_model(build_tokenizer(), TINY, seed=0)
    snapshot.load_state_dict(rec.at_begin[2])
    used, _ = rec.used[3]
    again = TorchEngine(snapshot, trainer.pad_id).generate(used.prompt_ids, trainer.collector.sampling_params(3))
    assert torch.equal(again.completion_ids, used.completion_ids)


def test_with_overlap_old_logprobs_are_the_sampling_logprobs(tmp_path):
    """Without sampler importance sampling the stale sampler is the old policy (PPO's clip corrects it)."""
    trainer = make_trainer(tmp_path, overlap=True, max_steps=3, sampler_is_correction=False)
    rec = Recorder(trainer)
    trainer.train()
    for step, (rollout, old) in rec.used.items():
        assert old is rollout.sampling_logps, step
    assert trainer.learner.forward_passes == len(rec.used)  # one micro-batch per step and no old-logprob pass


def test_with_overlap_by_default_importance_sampling_corrects_the_stale_sampler(tmp_path):
    """The default with overlap: the trainer's current weights are the old policy (K = 1: no old pass, ratio 1)
    and the truncated importance ratio trainer / sampler, formed inside the loss, corrects the staleness."""
    trainer = make_trainer(tmp_path, overlap=True, max_steps=3)
    assert trainer.learner.sampler_is
    rec = Recorder(trainer)
    trainer.train()
    for step, (_, old) in rec.used.items():
        assert old is None, step
    assert trainer.learner.forward_passes == len(rec.used)  # still no old-logprob pass
    lagged = [r for r in trainer.state.log_history if r["rollout_lag"] > 0]
    assert lagged and all(r["sampling/importance_sampling_ratio/max"] <= 3.0 for r in lagged)
    assert any(r["sampling/importance_sampling_ratio/mean"] != 1.0 for r in lagged)  # stale weights differ


def test_without_overlap_sampling_is_strictly_on_policy(tmp_path):
    trainer = make_trainer(tmp_path, overlap=False)
    rec = Recorder(trainer)
    trainer.train()
    assert [r["rollout_lag"] for r in trainer.state.log_history] == [0, 0, 0, 0]
    for step in range(1, 5):
        assert same(rec.sampled_with[step - 1][1], rec.at_begin[step])
        assert rec.used[step][1] is None  # K = 1 on-policy: no old log-probs at all


def test_prompts_are_consumed_in_the_same_order_with_and_without_overlap(tmp_path):
    runs = {}
    for overlap in (False, True):
        trainer = make_trainer(tmp_path / str(overlap), overlap=overlap, max_steps=5)
        rec = Recorder(trainer)
        trainer.train()
        runs[overlap] = (rec, trainer)
    assert runs[True][0].prompts == runs[False][0].prompts
    assert runs[True][1].sampler.state_dict() == runs[False][1].sampler.state_dict()  # nothing drawn past the end
    r_on, r_off = runs[True][0].used, runs[False][0].used
    assert torch.equal(r_on[1][0].completion_ids, r_off[1][0].completion_ids)  # step 1: same weights, same seed


def final_params(tmp_path, **kw) -> tuple[dict, list]:
    trainer = make_trainer(tmp_path, **kw)
    rec = Recorder(trainer)
    trainer.train()
    return params(trainer.model), [rec.prompts[s] for s in sorted(rec.prompts)]


def test_resume_with_a_pending_rollout_is_exact_and_loses_no_prompt(tmp_path):
    full, full_prompts = final_params(tmp_path / "full", overlap=True, max_steps=5)
    final_params(tmp_path / "cut", overlap=True, max_steps=5, save_steps=2)  # writes step-2 and step-4
    state = load_trainer_state(str(tmp_path / "cut" / "checkpoints" / "step-4"))
    pending = state["pending_rollout"]
    assert pending["step"] == 5 and pending["indices"] == full_prompts[4]
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-5")  # as if killed after saving step 4
    resumed, resumed_prompts = final_params(tmp_path / "cut", overlap=True, max_steps=5, resume="auto")
    assert resumed_prompts == [full_prompts[4]]  # the pending rollout was used, not re-drawn
    assert same(resumed, full)


def test_resume_without_overlap_gives_the_pending_prompts_back(tmp_path):
    _, full_prompts = final_params(tmp_path / "a", overlap=True, max_steps=3, save_steps=2)
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-3")
    _, resumed_prompts = final_params(tmp_path / "a", overlap=False, max_steps=3, resume="auto")
    assert resumed_prompts == [full_prompts[2]]  # re-sampled on-policy, same prompts


def test_under_torchrun_a_pending_rollout_is_undone_in_the_checkpoint(tmp_path):
    """Rank 0 alone writes the checkpoint, so the state rewinds the sampler to before the pending prompts."""
    trainer = make_trainer(tmp_path, overlap=True, max_steps=2)
    trainer.train_step(1)
    before = trainer.overlap.pending.sampler_before
    assert trainer.sampler.state_dict() != before
    assert "pending_rollout" in trainer._checkpoint_state()

    class FakeDist:
        enabled = True

    trainer.dist = FakeDist()
    state = trainer._checkpoint_state()
    assert state["sampler"] == before and "pending_rollout" not in state


@pytest.fixture(autouse=True)
def restore_affinity():
    """A CPU-concurrent scheduler binds the process to the learner's cores: give the next test all of them."""
    yield
    bind_process(set(INITIAL_CPUS))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", len(INITIAL_CPUS))))


def test_scheduler_runs_in_order_on_one_cpu_and_reraises_sampler_errors():
    sched = OverlapScheduler(torch.device("cpu"), concurrent=True, cpus={min(INITIAL_CPUS)})
    assert not sched.concurrent  # one CPU: no thread
    calls = []
    sched.launch(Prefetched(2, [0], 0, {}, 0), lambda: calls.append("sampled") or "rollout")
    assert calls == ["sampled"]  # ran at launch: before any optimizer step that follows
    assert sched.take(3) is None and sched.take(2).rollout == "rollout" and sched.pending is None

    def boom():
        raise RuntimeError("sampler failed")

    with pytest.raises(RuntimeError, match="sampler failed"):
        sched.launch(Prefetched(3, [1], 0, {}, 0), boom)
    assert sched.pending is None


def test_cpu_split_and_cpu_lists():
    assert parse_cpus("0,2-4") == {0, 2, 3, 4} and parse_cpus("1") == {1}
    with pytest.raises(ValueError, match="cpu list"):
        parse_cpus("0-x")
    assert split_cpus({0}, None) is None
    assert split_cpus({0, 1, 2, 3}, None) == ({0, 1}, {2, 3})
    assert split_cpus({0, 1, 2, 3}, 1) == ({0, 1, 2}, {3})
    with pytest.raises(ValueError, match="sampler_cores=2"):
        split_cpus({0, 1}, 2)


@pytest.mark.skipif(len(INITIAL_CPUS) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("bind", [False, True])
def test_cpu_scheduler_samples_in_a_thread_on_its_own_cores(bind):
    cpus = set(sorted(INITIAL_CPUS)[:2])
    sched = OverlapScheduler(torch.device("cpu"), concurrent=True, cpus=cpus, bind_cpus=bind, cpu_sampler="thread")
    learner, sampler = sched.cpu_split
    assert sched.concurrent and learner | sampler == cpus and not learner & sampler
    assert os.sched_getaffinity(0) == (learner if bind else INITIAL_CPUS)
    assert torch.get_num_threads() == len(learner)
    seen, release = {}, threading.Event()

    def sample():
        seen["thread"] = threading.current_thread() is not threading.main_thread()
        seen["cpus"] = os.sched_getaffinity(0)
        release.wait(10)  # still sampling when launch() returns: the caller trains meanwhile
        return "rollout"

    sched.launch(Prefetched(2, [0], 0, {}, 0), sample)
    assert sched.pending.rollout is None  # launch did not wait
    release.set()
    assert sched.take(2).rollout == "rollout"
    assert seen == {"thread": True, "cpus": sampler if bind else INITIAL_CPUS}
