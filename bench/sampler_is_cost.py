"""Time of the fused loss (forward + backward, torch backend on CPU) with sampler importance sampling off, in a
token mode and in a sequence mode without old log-probs (which needs one more no-grad lm_head pass there).

    python bench/sampler_is_cost.py [--tokens 512] [--vocab 151936] [--hidden 896]

Best of 3 per case, fp32, 2 threads; prints seconds per case.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]
from dash_kernels import fused_linear_pg_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--row-tokens", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(2)
    n, g = a.tokens, torch.Generator().manual_seed(0)
    h = torch.randn(n, a.hidden, generator=g).requires_grad_()
    w = (torch.randn(a.vocab, a.hidden, generator=g) / a.hidden**0.5).requires_grad_()
    targets, adv = torch.randint(0, a.vocab, (n,), generator=g), torch.randn(n, generator=g)
    tw = torch.full((n,), 1.0 / n)
    sampler = torch.full((n,), -12.0) + 0.01 * torch.randn(n, generator=g)
    rows = torch.arange(n) // a.row_tokens

    def best(**kw) -> float:
        out = float("inf")
        for _ in range(3):
            h.grad = w.grad = None
            t0 = time.perf_counter()
            loss, _ = fused_linear_pg_loss(h, w, None, targets, adv, tw, backend="torch", **kw)
            loss.backward()
            out = min(out, time.perf_counter() - t0)
        return out

    print(f"off {best():.3f} s")
    for mode in ("token_truncate", "sequence_mask"):
        print(f"{mode} {best(sampler_logp=sampler, row_ids=rows, is_mode=mode):.3f} s")


if __name__ == "__main__":
    main()
