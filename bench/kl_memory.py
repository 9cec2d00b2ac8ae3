"""Peak memory of one micro-batch's loss + backward with TRL's default KL (beta > 0, use_bias_correction_kl=True):
the fused kernel (`fused`: dash_kernels.fused_linear_pg_loss with kl_correction, the path it trains on now)
against losses.py's materialised-logits path (`variant`: variant_micro_loss, where it trained before).

    python bench/kl_memory.py                      # Qwen2.5-0.5B head: H 896, V 151936, N 1024 and 2048 tokens
    python bench/kl_memory.py --tokens 512 --vocab 32000

CPU only: each case runs in a fresh process; the figure is the process's peak resident memory (VmHWM, reset
after the inputs are made) during forward + backward, minus its resident memory just before: what the loss
adds on top of the hidden states and the lm_head (fp32, tied). Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(path: str, tokens: int, hidden_size: int, vocab: int, rows: int) -> dict:
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]
    from dash_kernels import fused_linear_pg_loss

    from dash_fast.losses import TrlLoss, variant_micro_loss

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden_size, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    lengths = [tokens // rows] * (rows - 1) + [tokens - (tokens // rows) * (rows - 1)]
    adv = torch.cat([torch.full((n,), a) for n, a in zip(lengths, torch.randn(rows, generator=g).tolist())])
    tw = torch.full((tokens,), 1.0 / tokens)
    with torch.no_grad():
        old = torch.full((tokens,), -3.0) + 0.1 * torch.randn(tokens, generator=g)
        ref = old + 0.1 * torch.randn(tokens, generator=g)
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    if path == "fused":
        loss, _ = fused_linear_pg_loss(h, w, None, targets, adv, tw, old, ref, beta=0.04, kl_correction=True,
                                       return_entropy=True, backend="torch")
    else:
        loss, _ = variant_micro_loss(TrlLoss(beta=0.04, use_bias_correction_kl=True, kernel_kl_correction=False),
                                     h, w, None, targets, lengths, adv, tw, old, ref)
    loss.backward()
    peak = _status("VmHWM")
    return {"path": path, "tokens": tokens, "hidden": hidden_size, "vocab": vocab,
            "peak_extra_mib": round((peak - before) / 2**20, 1),
            "logits_fp32_mib": round(tokens * vocab * 4 / 2**20, 1), "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--child", nargs=2, metavar=("PATH", "TOKENS"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.hidden, a.vocab, a.rows)))
        return
    for n in a.tokens:
        for path in ("variant", "fused"):
            out = subprocess.run([sys.executable, __file__, "--child", path, str(n), "--hidden", str(a.hidden),
                                  "--vocab", str(a.vocab), "--rows", str(a.rows)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
