"""Optional rollout engine: a vLLM `LLM` colocated in the trainer's process (`engine: vllm`).

    pip install dash-fast[vllm]      # CUDA only; imported lazily, so nothing else needs vLLM

Lifecycle per optimizer step (as TRL's `vllm_mode="colocate"`):

    optimizer.step() -> sync_weights(model): wake_up(["weights"]), load_weights in size-bounded buckets
    generate():       wake_up(["kv_cache"]), LLM.generate, sleep(level)   # frees the GPU for training

With `sleep_level=2` (default) vLLM discards its weights when it sleeps, so every wake is followed by a
full weight push (the trainer pushes after each optimizer step anyway; a generate without a push since
the last sleep, e.g. evaluation, pushes first). `sleep_level=1` offloads them to CPU instead.

Log-probs: vLLM returns the raw model's log-probs unless `logprobs_mode="processed_logprobs"`, which
this engine sets: the sampled token's log-prob after temperature, and after top-k / top-p truncation
(renormalised over the kept tokens). Without truncation (top_k <= 0, top_p = 1) that is exactly the
embedded engine's log softmax(logits / T). With truncation it is the log-prob under the distribution
actually sampled from (the behaviour policy), which is >= the full tempered one: the on-policy ratio
is then exp(logp_full - logp_trunc) <= 1 rather than 1. DASH's default (K = 1, no overlap) never uses
sampling log-probs in the loss; with overlap or K > 1 they serve as old log-probs (document this in a
run that sets top_k with the vLLM engine). vLLM versions without `logprobs_mode` (< 0.10.2) are refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dash_fast.rollout.base import Rollout, SamplingParams

INSTALL_HINT = "engine='vllm' needs vLLM, which is not installed: pip install dash-fast[vllm] (CUDA only)"


def import_vllm():
    """vLLM, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return vllm


def bucket_tensors(named: Iterable[tuple[str, torch.Tensor]],
                   max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Split (name, tensor) pairs, in order, into buckets of at most `max_bytes` each (a tensor larger
    than that travels alone): bounded extra memory per load_weights call, few calls."""
    buckets: list[list[tuple[str, torch.Tensor]]] = []
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, t))
        size += n
    if current:
        buckets.append(current)
    return buckets


def rollout_from_outputs(outputs: Sequence[Any], prompt_ids: list[list[int]], pad_token_id: int) -> Rollout:
    """vLLM `RequestOutput`s (one completion each, in request order) -> a right-padded Rollout.

    Reads `outputs[i].outputs[0].token_ids` and `.logprobs` (a list, per position, of
    {token_id: Logprob(logprob=...)}; the sampled token is always present when logprobs=0)."""
    comps = [o.outputs[0] for o in outputs]
    width = max([len(c.token_ids) for c in comps] + [1])
    ids = torch.full((len(comps), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(comps), width), dtype=torch.float32)
    logps = torch.zeros((len(comps), width), dtype=torch.float32)
    for i, c in enumerate(comps):
        tokens = list(c.token_ids)
        if not tokens:
            continue
        if c.logprobs is None or len(c.logprobs) < len(tokens):
            raise ValueError("vLLM returned no log-probs for a completion: sample with logprobs=0")
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1.0
        logps[i, : len(tokens)] = torch.tensor([float(c.logprobs[t][tok].logprob) for t, tok in enumerate(tokens)])
    return Rollout(prompt_ids=[list(p) for p in prompt_ids], completion_ids=ids, completion_mask=mask,
                   sampling_logps=logps, stats={"generated_tokens": int(mask.sum())})


class VLLMEngine:
    """Colocated vLLM behind the RolloutEngine interface (see the module docstring)."""

    can_sample_concurrently = False  # overlap=True runs its schedule in order with this engine

    def __init__(self, model: torch.nn.Module, tokenizer: Any, args: Any, *, sleep_level: int = 2,
                 bucket_bytes: int = 512 << 20, llm: Any = None) -> None:
        vllm = import_vllm()
        self.vllm = vllm
        self.model = model
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.sleep_level = sleep_level
        self.bucket_bytes = bucket_bytes
        if llm is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: direct load_weights
            source = getattr(model, "name_or_path", None)
            if not source:
                raise ValueError("engine='vllm' needs a model loaded from a path (model.name_or_path)")
            try:
                llm = vllm.LLM(
                    model=source, dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                    gpu_memory_utilization=getattr(args, "vllm_gpu_memory_utilization", 0.3),
                    max_model_len=args.max_prompt_tokens + args.max_completion_tokens,
                    enable_sleep_mode=True, logprobs_mode="processed_logprobs", seed=args.seed,
                )
            except TypeError as e:
                raise RuntimeError(f"this vLLM is too old for engine='vllm' (needs logprobs_mode): {e}") from e
        self.llm = llm
        self.asleep: set[str] = set()  # {"weights", "kv_cache"} while sleeping
        self.weights_fresh = False  # the first generate pushes the trainer's weights (SFT, resume)
        self._sleep()

    # ---------------------------------------------------------------- sleep mode
    def _sleep(self) -> None:
        self.llm.sleep(level=self.sleep_level)
        self.asleep = {"weights", "kv_cache"}
        if self.sleep_level >= 2:
            self.weights_fresh = False

    def _wake(self, tag: str) -> None:
        if tag in self.asleep:
            self.llm.wake_up(tags=[tag])
            self.asleep.discard(tag)

    # ---------------------------------------------------------------- weights
    def _vllm_model(self):
        """The model inside vLLM's in-process worker (V1, then V0 layout); None under multiprocessing."""
        executor = self.llm.llm_engine.model_executor
        worker = getattr(executor, "driver_worker", None)
        for path in (("worker", "model_runner", "model"), ("model_runner", "model")):
            obj = worker
            for attr in path:
                obj = getattr(obj, attr, None)
            if obj is not None:
                return obj
        return None

    def _load(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        target = self._vllm_model()
        if target is not None:
            target.load_weights(bucket)
        else:  # worker processes: send the bucket over vLLM's RPC (slower: a copy per worker)
            self.llm.apply_model(lambda m: m.load_weights(bucket))

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the trainer's parameters into vLLM, bucket by bucket, and drop its prefix cache."""
        self.model = model
        self._wake("weights")
        named = ((name, p.detach()) for name, p in model.named_parameters())
        for bucket in bucket_tensors(named, self.bucket_bytes):
            self._load(bucket)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()
        self.weights_fresh = True

    # ---------------------------------------------------------------- generate
    def sampling_params(self, params: SamplingParams, n_prompts: int) -> list[Any]:
        """One vLLM SamplingParams per prompt, seeded seed + i so each row is reproducible."""
        return [self.vllm.SamplingParams(
            n=1, temperature=params.temperature, top_k=params.top_k if params.top_k > 0 else -1,
            top_p=params.top_p, max_tokens=params.max_new_tokens, stop_token_ids=list(params.stop_token_ids),
            logprobs=0, detokenize=False, seed=None if params.seed is None else params.seed + i,
        ) for i in range(n_prompts)]

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        if not self.weights_fresh:
            self.sync_weights(self.model)
        self._wake("kv_cache")
        try:
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids],
                                        self.sampling_params(params, len(prompt_ids)), use_tqdm=False)
        finally:
            self._sleep()
        return rollout_from_outputs(outputs, prompt_ids, self.pad_token_id)
