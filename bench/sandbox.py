"""Throughput of the `code` reward: N MBPP-like programs (3 asserts each; a quarter of them wrong).

    python bench/sandbox.py [--n 512] [--workers 2] [--repeats 3]

Prints the wall time per batch (each repeat is one reward call on the whole batch) and the programs
per second. Also times one bare program (the per-program setup cost: fork, namespaces, mounts).
"""

from __future__ import annotations

import argparse
import statistics
import time

TEMPLATES = [
    ("def add_{i}(a, b):\n    return a + b{bug}\n", "add_{i}({a}, {b})", lambda a, b: a + b),
    ("def mul_{i}(a, b):\n    return a * b{bug}\n", "mul_{i}({a}, {b})", lambda a, b: a * b),
    (
        "import heapq\ndef small_{i}(xs, k):\n    return heapq.nsmallest(k, xs){bug2}\n",
        "small_{i}([{a}, {b}, 7, 1], 2)",
        lambda a, b: sorted([a, b, 7, 1])[:2],
    ),
]


def make_batch(n: int) -> tuple[list[str], list[list[str]]]:
    completions, tests = [], []
    for i in range(n):
        src, call, ref = TEMPLATES[i % len(TEMPLATES)]
        wrong = i % 4 == 3
        code = src.format(i=i, bug=" + 1" if wrong else "", bug2="[::-1]" if wrong else "")
        completions.append(f"```python\n{code}```")
        tests.append([f"assert {call.format(i=i, a=a, b=b)} == {ref(a, b)!r}" for a, b in ((1, 2), (3, 5), (-4, 9))])
    return completions, tests


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from dash_fast.rewards import make_code_reward
    from dash_fast.rewards.sandbox import run_python

    reward = make_code_reward(max_workers=args.workers)
    completions, tests = make_batch(args.n)
    reward([""], ["```python\nx = 1\n```"], test_list=[["assert x == 1"]])  # start-up (server, probe)
    t0 = time.perf_counter()
    for _ in range(20):
        run_python("x = 1\n", ["assert x == 1"])
    single_ms = (time.perf_counter() - t0) / 20 * 1e3
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        scores = reward([""] * args.n, completions, test_list=tests)
        times.append(time.perf_counter() - t0)
    expected = [0.0 if i % 4 == 3 else 1.0 for i in range(args.n)]
    assert scores == expected, "wrong scores"
    med = statistics.median(times)
    print(f"code reward: {args.n} programs x 3 asserts, {args.workers} workers: median {med:.2f} s per batch "
          f"({args.n / med:.0f} programs/s; runs {', '.join(f'{t:.2f}' for t in times)} s); "
          f"one program alone {single_ms:.1f} ms")


if __name__ == "__main__":
    main()
