"""Training roofline: the training forward + backward vs the measured GEMM rate, the AdamW step vs its bytes.

    python bench/train_roofline.py                                   # Qwen2.5-0.5B shape, 2 rows x (64 + 64)
    python bench/train_roofline.py --rows 4 --prompt 128 --completion 128 --reps 3
    python bench/train_roofline.py --shape tiny --reps 1             # smoke run
    python bench/train_roofline.py --micro-batches 4 --rows 16 --prompt 3 --completion 16 --reps 3 --optimizers ""

The forward is the learner's (forward.PolicyForward._decoder_hidden without shared prompts: the decoder's last hidden
state over right-padded prompt + completion rows, the positions that predict completion tokens gathered)
followed by its loss (dash_kernels.fused_linear_pg_loss with entropy, as the "fused" loss of dash_fast/losses.py calls it),
then `loss.backward()`. FLOPs are counted as executed: 6 x decoder-layer params x every token (prompt
included), 6 x lm_head params x completion tokens (the fused CPU loss does 3 matmuls per token), and
attention 12 x layers x heads x head_dim x L^2 per row (SDPA computes the whole square under a padding
mask). The GEMM rate is torch.mm [rows x L, hidden] @ [hidden, intermediate] measured in the same run.

The optimizer is torch.optim.AdamW as the trainer builds it (default implementation), then foreach=True
and fused=True, each timed on the same gradients from a fresh state (the first step, which allocates the
state, is the warm-up). Bytes moved: 7 x 4 per fp32 parameter (read param, grad, exp_avg, exp_avg_sq;
write param, exp_avg, exp_avg_sq), against read bandwidth measured in the same run.

`--micro-batches K` times gradient accumulation as the learner runs it on CPU instead: the shared-prompt forward
over K micro-batches of rows / K rows (one prompt each), the fused loss, backward, gradients set to None before
each optimizer step and host memory kept per phase (runtime/cpu_memory.py), in two variants alternated in the same
run: `in_place` (the learner's: from the second micro-batch on, the projections' dW and the head's gradient go
into .grad directly; models/grad_accumulation.py, fused_linear_pg_loss's grad_weight_into) and `autograd`
(decoder.PLAIN projections, no grad_weight_into: a new dW buffer per weight and micro-batch, added by autograd).
FLOPs as executed: 6 x decoder-layer params x (prompt tokens once per micro-batch + completion tokens) + 6 x
lm_head params x completion tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from rollout import qwen_05b_shape  # noqa: E402

from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer  # noqa: E402

ADAM_BYTES_PER_PARAM = 7 * 4


def training_step(model, rows: int, prompt: int, completion: int, seed: int = 0):
    """A closure running the learner's forward + fused loss + backward on random ids (completions of full
    length, advantages +-1), and the counts its FLOPs need."""
    from dash_kernels import fused_linear_pg_loss

    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    length = prompt + completion
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    pred = torch.zeros_like(ids, dtype=torch.bool)
    pred[:, prompt - 1 : length - 1] = True
    targets = ids[:, prompt:].reshape(-1)
    n = targets.numel()
    adv = torch.randn(rows, generator=g).sign().repeat_interleave(completion)
    weights = torch.full((n,), 1.0 / n)
    head = model.get_output_embeddings()
    decoder = getattr(model, model.base_model_prefix)

    def step():
        hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state[pred]
        loss, _ = fused_linear_pg_loss(hidden, head.weight, getattr(head, "bias", None), targets, adv, weights,
                                       None, None, temperature=1.0, return_entropy=True)
        loss.backward()

    return step, rows * length, n


def accumulation_steps(model, rows: int, prompt: int, completion: int, micro_batches: int, seed: int = 0):
    """{variant: closure}, each running one optimizer step's forward + backward over `micro_batches`
    shared-prompt micro-batches (see the module docstring)."""
    from dash_kernels import fused_linear_pg_loss

    from dash_fast.models.decoder import PLAIN
    from dash_fast.models.grad_accumulation import ACCUMULATING
    from dash_fast.models.shared_prompt import shared_prompt_hidden
    from dash_fast.runtime.cpu_memory import reuse_freed_memory

    if rows % micro_batches:
        raise SystemExit(f"--rows {rows} must be a multiple of --micro-batches {micro_batches}")
    g = torch.Generator().manual_seed(seed)
    vocab, per = model.config.vocab_size, rows // micro_batches
    prompts = [torch.randint(3, vocab, (prompt,), generator=g).tolist() for _ in range(micro_batches)]
    completions = [torch.randint(3, vocab, (completion,), generator=g).tolist() for _ in range(rows)]
    adv = torch.randn(rows, generator=g).sign().repeat_interleave(completion)
    weights = torch.full((rows * completion,), 1.0 / (rows * completion))
    head = model.get_output_embeddings()

    def variant(in_place: bool):
        def step():
            model.zero_grad(set_to_none=True)
            with reuse_freed_memory(gradients=True):
                for m in range(micro_batches):
                    tokens = slice(m * per * completion, (m + 1) * per * completion)
                    hidden, targets = shared_prompt_hidden(model, [prompts[m]] * per,
                                                           completions[m * per : (m + 1) * per], 0,
                                                           proj=ACCUMULATING if in_place else PLAIN)
                    loss, _ = fused_linear_pg_loss(hidden, head.weight, getattr(head, "bias", None), targets,
                                                   adv[tokens], weights[tokens], return_entropy=True,
                                                   grad_weight_into=head.weight.grad if in_place else None)
                    loss.backward()
        return step

    return {"in_place": variant(True), "autograd": variant(False)}


def executed_flops(dims: dict, rows: int, length: int, completion_tokens: int) -> float:
    """Forward + backward FLOPs as executed (see the module docstring)."""
    attn = 12 * dims["layers"] * dims["heads"] * dims["head_dim"] * length * length * rows
    return 6 * dims["body"] * rows * length + 6 * dims["head"] * completion_tokens + attn


def best_ms(fn, reps: int) -> tuple[float, float]:
    """(best, median) ms of `reps` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[0], ts[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen0.5b", choices=["tiny", "qwen0.5b"])
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--optimizers", default="default,foreach,fused")
    ap.add_argument("--micro-batches", type=int, default=0, help="time gradient accumulation (module docstring)")
    args = ap.parse_args()
    common.set_threads(args.threads)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, TinyConfig(), seed=0) if args.shape == "tiny" else qwen_05b_shape(tokenizer)
    model.train()
    dims = common.decoder_dims(model)
    n_params = sum(p.numel() for p in model.parameters())
    length = args.prompt + args.completion
    bandwidth = common.measure_bandwidth()
    m = args.prompt + args.rows // args.micro_batches * args.completion if args.micro_batches else args.rows * length
    gemm = common.measure_gemm(m, dims["hidden"], model.config.intermediate_size)
    gemm_1024 = common.measure_gemm(1024, dims["hidden"], model.config.intermediate_size)
    print(f"{common.device_name('cpu')}: read bandwidth {bandwidth / 1e9:.1f} GB/s; GEMM "
          f"{gemm / 1e9:.1f} GFLOP/s at m={m}, {gemm_1024 / 1e9:.1f} at m=1024")

    if args.micro_batches:
        accumulation(model, dims, args, gemm, gemm_1024)
        return
    step, tokens, completion_tokens = training_step(model, args.rows, args.prompt, args.completion)
    flops = executed_flops(dims, args.rows, length, completion_tokens)

    def fwd_bwd():
        model.zero_grad(set_to_none=False)
        step()

    best, med = best_ms(fwd_bwd, args.reps)
    bound = flops / gemm * 1e3
    print(f"forward+backward: {args.rows} rows x ({args.prompt} + {args.completion}) = {tokens} tokens, "
          f"{flops / 1e12:.2f} TFLOP executed (6 x params x tokens = {6 * n_params * tokens / 1e12:.2f}); "
          f"best {best:.0f} ms, median {med:.0f} ms; GEMM-rate bound {bound:.0f} ms: "
          f"{bound / best:.0%} (best) / {bound / med:.0%} (median) of the measured GEMM throughput, "
          f"{flops / best / 1e6:.1f} GFLOP/s achieved")

    adam_bytes = ADAM_BYTES_PER_PARAM * n_params
    adam_bound = adam_bytes / bandwidth * 1e3
    for kind in args.optimizers.split(","):
        extra = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, **extra)
        best, med = best_ms(opt.step, args.reps)
        print(f"AdamW {kind:8s}: best {best:.0f} ms, median {med:.0f} ms; {adam_bytes / 2**30:.1f} GiB moved at "
              f"{bandwidth / 1e9:.1f} GB/s = {adam_bound:.0f} ms: {adam_bound / best:.0%} of the bandwidth bound")
        del opt


def accumulation(model, dims: dict, args: argparse.Namespace, gemm: float, gemm_1024: float) -> None:
    """The `--micro-batches` comparison: the two variants alternated (ABBA) `--reps` times after a warm-up each."""
    from dash_fast.runtime.cpu_memory import keep_freed_memory

    tables = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    layer_bytes = max(p.numel() * p.element_size() for p in model.parameters() if all(p is not t for t in tables))
    keep_freed_memory(sum(p.numel() * p.element_size() for p in model.parameters()), layer_bytes)
    steps = accumulation_steps(model, args.rows, args.prompt, args.completion, args.micro_batches)
    tokens = args.micro_batches * args.prompt + args.rows * args.completion
    flops = 6 * dims["body"] * tokens + 6 * dims["head"] * args.rows * args.completion
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for rep in range(args.reps):  # ABBA: neither variant always runs right after the other's step
        for name, step in (steps.items() if rep % 2 == 0 else reversed(steps.items())):
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    print(f"gradient accumulation: {args.rows} rows x {args.completion} tokens in {args.micro_batches} micro-batches "
          f"(prompt {args.prompt} tokens each), {flops / 1e12:.2f} TFLOP executed; GEMM bound {flops / gemm * 1e3:.0f} ms")
    med = {}
    for name, ts in times.items():
        ts.sort()
        med[name] = ts[len(ts) // 2]
        print(f"  {name:9s}: best {ts[0]:.0f} ms, median {med[name]:.0f} ms, {flops / med[name] / 1e6:.1f} GFLOP/s; "
              f"{flops / gemm * 1e3 / med[name]:.0%} / {flops / gemm_1024 * 1e3 / med[name]:.0%} of the measured GEMM "
              f"throughput at the micro-batch's m / m=1024 (median)")
    print(f"  autograd / in_place (median): {med['autograd'] / med['in_place']:.2f}x")


if __name__ == "__main__":
    main()
