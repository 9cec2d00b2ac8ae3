"""Why the learner slows beside the CPU sampler: the learner's update timed alone, beside a
sampler *thread* and beside a sampler *process* (1 torch thread each), unbound and bound to one core each.

    python bench/overlap_diag.py [--updates 6] [--cases cores,alone,thread,process,thread_bound,process_bound]

`cores` first checks whether the machine runs two CPU-bound processes at once at full speed (a matmul
loop and a pure-Python loop, one and then two at a time).

The workload is bench/e2e.py's dash step on the embedded default (64 prompts x 8 rows, 24 tokens): one
rollout is sampled, then the learner's update on it is timed `--updates` times while the sampler loops
`generate` of another such rollout from the same weights. Also reported: the learner thread's own CPU time
per update (time.thread_time; wall minus CPU = time it was runnable or blocked but not running: waiting
for the GIL or for a core), the sampler's generate time in the same window, and the CPU the learner and
the sampler used together per wall second ("cores used": about 1 in order; up to 2 when both run at
once). Thread vs process at the same core count separates the GIL (shared only by threads) from the
cores (shared by both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def build(warm: dict):
    import e2e

    from dash_fast import algo
    from dash_fast.trainer import DashTrainer

    s = {"prompts": 64, "group": 8, "max_tokens": 24, "lr": 1e-4, "seed": 0, "steps": 100, "eval_examples": 10}
    cfg = e2e.dash_config("dash", s)
    trainer = DashTrainer(warm["model"], cfg.reward_funcs, args=cfg, train_dataset=warm["train"])
    batch = trainer.collector.collect(1, 0)
    adv = algo.group_advantages(batch.rewards, cfg.group_size, cfg.scale_rewards)
    kept = algo.filter_rows(adv, cfg.filter_tau)
    prompts = [trainer.train_data.prompt_ids[i] for i in range(64) for _ in range(8)]
    params = trainer.collector.sampling_params(2)
    return trainer, batch, adv, kept, prompts, params


def sampler_process(path: str, pad_id: int, prompts, params, cpus, ready, stop, times) -> None:
    torch.set_num_threads(1)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    from transformers import AutoModelForCausalLM

    from dash_fast.engines.torch_engine import TorchEngine

    engine = TorchEngine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), pad_id)
    engine.generate(prompts, params)  # warm-up
    ready.set()
    while not stop.is_set():
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        times.append(time.perf_counter() - t0)


def child_cpu(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` so far (0 for None)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _probe(kind: str, out) -> None:
    """Best of 3: 400 fp32 256x256 matmuls (1 thread) or 3M iterations of a Python loop."""
    torch.set_num_threads(1)
    a, best = torch.randn(256, 256), float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        if kind == "matmul":
            for _ in range(400):
                a @ a
        else:
            x = 0
            for i in range(3_000_000):
                x += i
        best = min(best, time.perf_counter() - t0)
    out.put(best)


def core_scaling() -> None:
    """Can this machine run two CPU-bound processes at once at full speed? (1 then 2 probes at a time)."""
    ctx = mp.get_context("spawn")
    for kind in ("matmul", "python"):
        times = {}
        for n in (1, 2):
            out = ctx.Queue()
            procs = [ctx.Process(target=_probe, args=(kind, out)) for _ in range(n)]
            for p in procs:
                p.start()
            times[n] = [out.get() for _ in procs]
            for p in procs:
                p.join()
        print(f"cores {kind:7s} alone {times[1][0]:.3f}s, two at once {max(times[2]):.3f}s each: "
              f"{2 * times[1][0] / max(times[2]):.2f}x the throughput of one  load {os.getloadavg()[0]:.2f}")


def time_updates(trainer, batch, adv, kept, n: int) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.thread_time()
        trainer.update(batch.rollout, adv, kept, lengths=batch.lengths)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return wall, cpu


def main() -> None:
    import e2e

    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=6)
    ap.add_argument("--cases", default="cores,alone,thread,process,thread_bound,process_bound,generate_alone")
    args = ap.parse_args()
    if "cores" in args.cases.split(","):
        core_scaling()
    torch.set_num_threads(1)
    warm = e2e.setup_run(argparse.Namespace(results_dir=None, threads=1, workdir=None, seed=0, smoke=False))
    trainer, batch, adv, kept, prompts, params = build(warm)
    engine = trainer.engine
    cpus = sorted(os.sched_getaffinity(0))
    print(f"cpus {cpus}; load {os.getloadavg()}; kept rows {len(kept)}")
    time_updates(trainer, batch, adv, kept, 1)  # warm-up
    for case in [c for c in args.cases.split(",") if c != "cores"]:
        bound = case.endswith("_bound")
        if bound:
            os.sched_setaffinity(0, {cpus[0]})
        gen_times: list[float] = []
        stop = threading.Event()
        if case == "generate_alone":
            for _ in range(args.updates):
                t0 = time.perf_counter()
                engine.generate(prompts, params)
                gen_times.append(time.perf_counter() - t0)
            print(f"{case:15s} generate p50 {statistics.median(gen_times):.3f}s")
            continue
        worker = None
        if case.startswith("thread"):
            def loop(bound=bound, stop=stop, gen_times=gen_times) -> None:
                if bound:
                    os.sched_setaffinity(0, {cpus[1]})
                with torch.no_grad():
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        engine.generate(prompts, params)
                        gen_times.append(time.perf_counter() - t0)

            worker = threading.Thread(target=loop, daemon=True)
            worker.start()
            time.sleep(0.5)
        elif case.startswith("process"):
            ctx = mp.get_context("spawn")
            ready, pstop, ptimes = ctx.Event(), ctx.Event(), ctx.Manager().list()
            worker = ctx.Process(target=sampler_process, args=(warm["model"], trainer.pad_id, prompts, params,
                                                               {cpus[1]} if bound else None, ready, pstop, ptimes),
                                 daemon=True)
            worker.start()
            ready.wait(120)
        pid = worker.pid if case.startswith("process") else None
        t0, own0, kid0 = time.perf_counter(), sum(os.times()[:2]), child_cpu(pid)
        wall, cpu = time_updates(trainer, batch, adv, kept, args.updates)
        cores = (sum(os.times()[:2]) - own0 + child_cpu(pid) - kid0) / (time.perf_counter() - t0)
        if case.startswith("thread"):
            stop.set()
            worker.join()
        elif case.startswith("process"):
            pstop.set()
            worker.join(60)
            gen_times = list(ptimes)
        if bound:
            os.sched_setaffinity(0, set(cpus))
        gen = f"generate p50 {statistics.median(gen_times):.3f}s ({len(gen_times)})" if gen_times else ""
        print(f"{case:15s} update p50 {statistics.median(wall):.3f}s  learner cpu p50 {statistics.median(cpu):.3f}s"
              f"  {gen}  cores used {cores:.2f}  load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
