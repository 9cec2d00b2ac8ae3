"""Where a trainer's peak RSS comes from: the process's peak resident set (VmHWM) per phase of a run.

    python bench/rss_phases.py --shape qwen0.5b --steps 2               # dash_fast.GRPOTrainer
    python bench/rss_phases.py --shape qwen0.5b --steps 2 --trainer trl  # trl.GRPOTrainer (coarser phases)

The run is bench/swap.py's (the same model, prompts, reward and GRPOConfig; a TRL script's imports first).
At each phase boundary the peak since the last boundary is read from /proc/self/status (VmHWM) and the
peak is reset (/proc/self/clear_refs, 5), so each phase reports the highest RSS reached inside it: start-up
(imports, model load, trainer and engine set-up), then per step generate, reward, train (forward +
backward, old / ref log-probs), optimizer, the rest (weights to the sampler, records). dash-fast's phases
are its own NVTX ranges (runtime/profiling.RANGES, as bench/e2e.py times them); TRL's come from its
callbacks (step begin / optimizer step / step end). Also prints the sizes that explain a peak: parameters,
gradients and AdamW state, and the engine's KV cache.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

GB = 2**30


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


class Phases:
    """Peak RSS per phase: `enter(name)` closes the running phase (its peak = VmHWM since it began)."""

    def __init__(self) -> None:
        self.peaks: list[tuple[str, float, float]] = []  # (phase, peak GB, RSS at its end GB)
        self.name = "start-up"
        self.resettable = common.reset_peak_rss()

    def enter(self, name: str) -> None:
        s = _status()
        if self.peaks and self.peaks[-1][0] == self.name:  # the same phase again (the next micro-batch)
            self.peaks[-1] = (self.name, max(self.peaks[-1][1], s["VmHWM"] / GB), s["VmRSS"] / GB)
        else:
            self.peaks.append((self.name, s["VmHWM"] / GB, s["VmRSS"] / GB))
        self.name = name
        common.reset_peak_rss()

    @contextlib.contextmanager
    def region(self, name: str):
        self.enter(name)
        try:
            yield
        finally:
            self.enter("  (between phases)")


def dash_phases(phases: Phases) -> None:
    """Route dash-fast's top-level NVTX ranges (profiling.RANGES) through `phases` (bench-only hook, as
    bench/e2e.py's timer)."""
    from dash_fast import collect, forward, learner
    from dash_fast.runtime import profiling

    original, depth = profiling.nvtx_range, [0]

    @contextlib.contextmanager
    def ranged(name: str):
        top = name in profiling.RANGES and depth[0] == 0
        depth[0] += top
        try:
            with original(name), (phases.region(name) if top else contextlib.nullcontext()):
                yield
        finally:
            depth[0] -= top

    collect.nvtx_range = learner.nvtx_range = forward.nvtx_range = ranged


def tensor_gb(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / GB


def main() -> None:
    import swap

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(swap.SHAPES), default="qwen0.5b")
    ap.add_argument("--trainer", choices=("dash", "trl"), default="dash")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", "--completions", dest="group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16=True, as a TRL script sets it (default: fp32)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dash-fast-swap"))
    a = ap.parse_args()
    model_dir = swap.build_model_dir(a.shape, a.workdir)  # before the phases: not part of a user's run
    phases = Phases()
    if not phases.resettable:
        print("warning: /proc/self/clear_refs is not writable: each phase shows the peak so far")
    phases.enter("imports")
    import datasets
    import torch
    import transformers  # noqa: F401  (a TRL script's imports first)
    from transformers import TrainerCallback

    if a.trainer == "dash":
        from dash_fast import GRPOConfig, GRPOTrainer

        dash_phases(phases)
    else:
        from trl import GRPOConfig, GRPOTrainer
    os.environ["SWAP_GROUP"] = str(a.group)

    class Marks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if a.trainer == "trl":
                phases.enter(f"step {state.global_step + 1}: generate + train")
            else:
                phases.enter(f"step {state.global_step + 1} begins")

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if a.trainer == "trl":
                phases.enter(f"step {state.global_step + 1}: optimizer")

        def on_step_end(self, args, state, control, **kw):
            phases.enter(f"after step {state.global_step}")

    data = datasets.Dataset.from_list([{"prompt": p} for p in swap.train_prompts(a.prompt_tokens)])
    out_dir = tempfile.TemporaryDirectory(prefix="rss-")  # removed at exit: dash-fast saves a checkpoint at the end
    args = GRPOConfig(output_dir=out_dir.name, per_device_train_batch_size=a.prompts * a.group,
                      num_generations=a.group, max_completion_length=a.tokens, max_steps=a.steps, use_cpu=True,
                      bf16=a.bf16, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    phases.enter("trainer set-up (model load, engine, optimizer)")
    trainer = GRPOTrainer(model_dir, swap.group_place_reward, args=args, train_dataset=data, callbacks=[Marks()])
    phases.enter("train() begins")
    t0 = time.perf_counter()
    trainer.train()
    phases.enter("end")
    model = trainer.model
    params = list(model.parameters())
    opt = trainer.optimizer
    opt_state = [v for st in getattr(opt, "state", {}).values() for v in st.values()
                 if isinstance(v, torch.Tensor) and v.numel() > 1]
    print(f"\n{a.trainer} at {a.shape}: {a.prompts} x {a.group} rows of {a.tokens} tokens, prompts "
          f"{a.prompt_tokens or 7} tokens, {a.steps} steps in {time.perf_counter() - t0:.1f} s, "
          f"{torch.get_num_threads()} threads")
    print(f"parameters {tensor_gb(params):.2f} GB, gradients {tensor_gb(p.grad for p in params):.2f} GB, "
          f"optimizer state {tensor_gb(opt_state):.2f} GB")
    static = getattr(getattr(trainer, "engine", None), "static_decoder", None)
    kv = [*static.k, *static.v] if static is not None else []
    if kv:
        print(f"engine KV cache {tensor_gb(kv):.3f} GB ({kv[0].shape} x {len(kv)})")
    print(f"\n{'phase':58s} {'peak RSS GB':>11s} {'RSS at end GB':>14s}")
    for name, peak, end in phases.peaks:
        print(f"{name:58s} {peak:11.2f} {end:14.2f}")
    print(f"overall peak (max of the phases): {max(p for _, p, _ in phases.peaks):.2f} GB")


if __name__ == "__main__":
    main()
