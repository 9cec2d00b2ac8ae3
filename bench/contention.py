"""Optimizer-step time under CPU contention: p50 / p99 / max per thread policy, with and without a competitor.

    flock /work/wt/bench.lock python bench/contention.py --task embedded --steps 40
    flock /work/wt/bench.lock python bench/contention.py --task trl --steps 200
    python bench/contention.py --smoke          # seconds (tests/integration/test_bench_smoke.py)

Each (policy, competitor) pair runs in a fresh child process, because the OpenMP settings (OMP_WAIT_POLICY,
GOMP_SPINCOUNT, OMP_PROC_BIND) are read once, when libgomp starts, and a thread count chosen in one run must not
leak into the next. Pairs are interleaved (every policy without, then with, the competitor, round after round)
so that the other jobs on a shared machine hit all policies alike.

Tasks (both start from e2e.py's SFT warm start of the embedded default):
  embedded  DashTrainer on the embedded default's settings (64 prompts x 8, 24 tokens; ~0.4 s steps)
  trl       dash_fast.GRPOTrainer from a TRL-style script (8 prompts x 4, 16 tokens; ~0.1 s steps, the
            shape of a TRL script's step)
Competitors (started before the trainer, killed after it):
  py        one Python busy loop (`while True: pass`: one core, no syscalls)
  torch     a second torch process multiplying 256x256 matrices with 2 OpenMP threads (another trainer)
  <name>_session  the same, started in a new session: with autogroup scheduling (Linux's default for
            desktops, on here) each session gets an equal share of the CPUs whatever its processes' nice
Policies: default (what dash-fast does with no thread settings: cpu_threads=auto, dash_fast imported before
torch: PASSIVE), torch_first (the same in a script that imports torch before dash_fast: libgomp's short spin,
runtime.device.shorten_openmp_spin), torch (torch's own: one thread per core, libgomp's default spin of 300000,
as TRL runs), t1 (cpu_threads=1),
t2_passive (OMP_WAIT_POLICY=PASSIVE), t2_spin (GOMP_SPINCOUNT=0), t2_spin10k (GOMP_SPINCOUNT=10000), t2_bound
(OMP_PROC_BIND=true, OMP_PLACES=cores: each thread bound to one core, libgomp's default spin); embedded task
only: overlap (overlap=true: the sampler process on one core, the learner on the other), vllm (engine=vllm in
its own engine process, bound to both cores, in order) and vllm_overlap (that process on the sampler's core,
sampling beside the update); all three with cpu_threads=auto. vLLM's engine process is not in the CPU /
run-queue columns, which count the trainer's own threads.
Every step is timed from outside (the gap between `on_step_end` callbacks: what a user's clock sees), with the
process's run-queue wait (/proc/self/task/*/schedstat), CPU time and GC pauses over the same step, which is
what tells the causes apart.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
# name -> (environment set before the child starts, DashConfig keys)
POLICIES: dict[str, tuple[dict[str, str], dict]] = {
    "default": ({}, {}),
    "torch_first": ({}, {"_import_torch_first": True}),
    "torch": ({"GOMP_SPINCOUNT": "300000"}, {"cpu_threads": None}),
    "t1": ({}, {"cpu_threads": 1}),
    "t2_passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, {"cpu_threads": 2}),
    "t2_spin": ({"GOMP_SPINCOUNT": "0"}, {"cpu_threads": 2}),
    "t2_spin10k": ({"GOMP_SPINCOUNT": "10000"}, {"cpu_threads": 2}),
    "t2_bound": ({"OMP_PROC_BIND": "true", "OMP_PLACES": "cores"}, {"cpu_threads": 2}),
    "overlap": ({}, {"overlap": True}),
    "vllm": ({}, {"engine": "vllm", "vllm_process": True, "vllm_kv_cache_bytes": 256 << 20}),
    "vllm_overlap": ({}, {"engine": "vllm", "overlap": True, "vllm_kv_cache_bytes": 256 << 20}),
}
COMPETITORS = {
    "py": [sys.executable, "-c", "while True: pass"],
    "torch": [sys.executable, "-c", "import torch\ntorch.set_num_threads(2)\na = torch.randn(256, 256)\n"
              "while True: a = torch.tanh(a @ a)"],
}
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "OMP_PLACES",
              "GOMP_CPU_AFFINITY", "MKL_NUM_THREADS")


# ---------------------------------------------------------------- child: one trainer run
def sched_totals() -> tuple[float, float]:
    """(seconds on CPU, seconds runnable but waiting for a CPU) summed over this process's threads."""
    on_cpu = waiting = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                a, b, _ = f.read().split()
        except (FileNotFoundError, ValueError):
            continue
        on_cpu, waiting = on_cpu + int(a), waiting + int(b)
    return on_cpu / 1e9, waiting / 1e9


def make_recorder(out: str | None = None):
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time, CPU time, run-queue wait and GC pause of each optimizer step, seen from outside."""

        def __init__(self) -> None:
            self.out, self.startup = out, 0.0
            self.steps: list[dict] = []
            self.gc_s = 0.0
            self._gc_t0 = 0.0
            gc.callbacks.append(self._gc)
            self._mark()

        def _gc(self, phase: str, info: dict) -> None:
            if phase == "start":
                self._gc_t0 = time.perf_counter()
            else:
                self.gc_s += time.perf_counter() - self._gc_t0

        def _mark(self) -> None:
            self._t, (self._cpu, self._wait), self._gc_at = time.perf_counter(), sched_totals(), self.gc_s

        def on_train_begin(self, args, state, control, **kw):
            self._mark()

        def on_step_end(self, args, state, control, **kw):
            t, (cpu, wait) = time.perf_counter(), sched_totals()
            self.steps.append({"wall": t - self._t, "cpu": cpu - self._cpu, "runq_wait": wait - self._wait,
                               "gc": self.gc_s - self._gc_at, "threads": torch.get_num_threads()})
            if self.out:  # after every step: a run stopped at the timeout still reports its steps
                write_result(self.out, self, self.startup, finished=False)
            self._mark()

    return StepClock()


def write_result(path: str, clock, startup: float, finished: bool) -> None:
    import torch

    from dash_fast.runtime import device as device_setup

    out = {"steps": clock.steps, "startup_s": startup, "threads": torch.get_num_threads(), "finished": finished,
           "openmp_wait": device_setup.openmp_wait,
           "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ}}
    Path(path + ".tmp").write_text(json.dumps(out))
    os.replace(path + ".tmp", path)


def child(args: argparse.Namespace) -> None:
    policy_cfg = json.loads(args.policy_cfg)
    if policy_cfg.pop("_import_torch_first", False):
        import torch  # noqa: F401
    import importlib
    import warnings

    importlib.import_module("dash_fast")  # before torch (unless the policy says otherwise), as the CLI does
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    warm = json.loads(args.warm)
    clock = make_recorder(args.out)
    t_start = time.perf_counter()
    if args.task == "embedded":
        from e2e import dash_config

        from dash_fast.trainer import DashTrainer

        s = {"prompts": 8 if args.smoke else 64, "group": 4 if args.smoke else 8, "max_tokens": 8 if args.smoke else 24,
             "lr": 1e-4, "steps": args.steps, "seed": 0, "eval_examples": 0, "smoke": args.smoke}
        cfg = dash_config("dash", s, eval_every=0, save_steps=0, **policy_cfg)
        trainer = DashTrainer(warm["model"], cfg.reward_funcs, args=cfg, train_dataset=warm["train"],
                              callbacks=[clock])
    else:
        from datasets import Dataset

        from dash_fast import GRPOConfig, GRPOTrainer
        from dash_fast.data.prompts import load_rows

        cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="contention-"), per_device_train_batch_size=32,
                         num_generations=4, max_completion_length=8 if args.smoke else 16, learning_rate=1e-4,
                         max_steps=args.steps, beta=0.0, loss_type="dr_grpo", logging_steps=10, save_steps=10**9,
                         use_cpu=True, report_to="none", disable_tqdm=True, seed=0, extra=policy_cfg)
        data = Dataset.from_list(load_rows(warm["train"]))
        trainer = GRPOTrainer(warm["model"], "exact_answer", args=cfg, train_dataset=data, callbacks=[clock])
    clock.startup = time.perf_counter() - t_start
    trainer.train()
    write_result(args.out, clock, clock.startup, finished=True)


# ---------------------------------------------------------------- parent: the grid
def summarize(steps: list[dict], warmup: int) -> dict:
    walls = sorted(s["wall"] for s in steps[warmup:])
    if not walls:
        nan = float("nan")
        return {"n": 0, "p50": nan, "p99": nan, "max": nan, "over_1s": 0, "p99/p50": nan, "cpu/wall": nan,
                "runq/wall": nan, "gc_s_max": nan, "threads_seen": ""}
    kept = steps[warmup:]

    def q(p: float) -> float:
        return walls[min(len(walls) - 1, round(p * (len(walls) - 1)))]

    p50 = statistics.median(walls)
    total = sum(walls)
    return {"n": len(walls), "p50": p50, "p99": q(0.99), "max": walls[-1], "over_1s": sum(w > 1.0 for w in walls),
            "p99/p50": q(0.99) / p50, "cpu/wall": sum(s["cpu"] for s in kept) / total,
            "runq/wall": sum(s["runq_wait"] for s in kept) / total, "gc_s_max": max(s["gc"] for s in kept),
            "threads_seen": "/".join(str(t) for t in sorted({s["threads"] for s in kept}))}


def run_child(task: str, policy: str, competitor: str | None, args: argparse.Namespace, warm: dict) -> dict:
    env_over, cfg = POLICIES[policy]
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env.update(env_over)
    out = tempfile.mktemp(suffix=".json", prefix="contention-")
    cmd = [sys.executable, __file__, "--child", "--task", task, "--steps", str(args.steps), "--out", out,
           "--policy-cfg", json.dumps(cfg), "--warm", json.dumps(warm)] + (["--smoke"] if args.smoke else [])
    rival = None
    if competitor:  # "<name>_session": in a session of its own, so in its own autogroup (another user or terminal)
        name, _, session = competitor.partition("_")
        rival = subprocess.Popen(COMPETITORS[name], env=env, start_new_session=bool(session))
        if session:  # the same group weight as ours (this script may run with its autogroup's nice changed)
            with open("/proc/self/autogroup") as f:
                nice = f.read().split()[-1]
            with open(f"/proc/{rival.pid}/autogroup", "w") as f:
                f.write(nice)
    try:
        subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"  ({policy}, {competitor}): stopped at the {args.timeout:.0f} s timeout", flush=True)
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    if not os.path.exists(out):
        return {"steps": [], "startup_s": float("nan"), "threads": 0, "finished": False}
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="embedded", choices=["embedded", "trl"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the percentiles")
    ap.add_argument("--policies", default="torch,t1,t2_passive,t2_spin,t2_bound,default")
    ap.add_argument("--competitors", default="none,py", help="none, py, torch (comma-separated)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--workdir", default=None, help="warm start cache (default: e2e.py's, runs/bench-warm[-smoke])")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--policy-cfg", help=argparse.SUPPRESS)
    ap.add_argument("--warm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.smoke:
        args.steps, args.warmup = 3, 1
    import e2e

    ns = argparse.Namespace(results_dir=None, threads=1, workdir=args.workdir, seed=0, smoke=args.smoke)
    os.environ.pop("OMP_NUM_THREADS", None)  # setup_run sets it for its own process only
    saved = dict(os.environ)
    warm = e2e.setup_run(ns)
    os.environ.clear()
    os.environ.update(saved)
    policies, competitors = args.policies.split(","), [c if c != "none" else None for c in args.competitors.split(",")]
    for name in policies:
        if name not in POLICIES:
            raise SystemExit(f"--policies: unknown {name!r} (known: {', '.join(POLICIES)})")
    print(f"task {args.task}, {args.steps} steps ({args.warmup} warm-up left out), competitors {args.competitors}; "
          f"load {os.getloadavg()[0]:.2f}, cpus {sorted(os.sched_getaffinity(0))}", flush=True)
    rows = []
    for r in range(args.rounds):
        for policy in policies:
            for competitor in competitors:
                res = run_child(args.task, policy, competitor, args, warm)
                row = {"task": args.task, "policy": policy, "competitor": competitor or "none", "round": r,
                       "threads": res["threads"], "startup_s": res["startup_s"], **summarize(res["steps"], args.warmup)}
                base = next((b for b in rows if b["policy"] == policy and b["competitor"] == "none"
                             and b["round"] == r), None)
                row["p99/p50_alone"] = row["p99"] / base["p50"] if base else float("nan")
                row["finished"], row["openmp_wait"] = res["finished"], res.get("openmp_wait")
                rows.append(row)
                print(f"{policy:11s} {row['competitor']:13s} threads {row['threads_seen']:4s} n {row['n']:4d}{'' if res['finished'] else '*'} "
                      f"p50 {row['p50']:.3f}  p99 {row['p99']:.3f}  max {row['max']:.3f}  >1s {row['over_1s']:3d}  "
                      f"p99/p50 {row['p99/p50']:.2f}  p99/p50(alone) {row['p99/p50_alone']:.2f}  cpu/wall "
                      f"{row['cpu/wall']:.2f}  runq/wall {row['runq/wall']:.2f}  gc max {row['gc_s_max']:.3f}  "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
    print("n*: stopped at the timeout; p99/p50(alone): p99 over the same policy's p50 without a competitor, same round")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
