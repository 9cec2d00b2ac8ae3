"""FSDP2 on CPU (gloo): two ranks with parallel=fsdp2 give the loss, gradient and weights after a step of one
process and of parallel=ddp, with the filter on and off, in float32 (FSDP2's reduce-scatter needs plain SUM on
gloo: distributed.fully_shard_model) and float64; the sharded model saves as a plain Hugging Face directory and
resumes. Two torchrun agents (--nnodes 2, c10d rendezvous) train like one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cli_runs import RESUME_STEPS, dash_run, write_fault_rewards
from helpers import TINY_DDP as TINY
from helpers import free_port, half_constant_reward, keep_grads

from dash_fast import DashConfig, DashTrainer
from dash_fast.embedded.tiny import build_model, build_tokenizer, make_task

# (name, overrides): every case runs in one process and in the same two ranks (one process group, one spawn)
CASES = [
    ("fused_filter", dict(dtype="float32", loss_impl="fused")),
    ("naive_nofilter", dict(dtype="float32", loss_impl="naive", filter_tau=None)),
    ("f64_filter", dict(dtype="float64", loss_impl="naive")),
]
# one step's loss sums over ranks in another order than in one process: float32 rounding, not bit for bit
TOL = {"float32": dict(rtol=1e-4, atol=1e-6), "float64": dict(rtol=1e-5, atol=1e-8)}
LR = 1e-2
# AdamW's first step moves a weight by lr * g / (|g| + 1e-8): where |g| is near 1e-8 the rounding of g shows up
# to lr * 1e-3 (seen: 8e-6); a missing or wrong step shows up to lr
WEIGHTS_TOL = dict(rtol=0, atol=LR * 1e-2)


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plain tensor (FSDP2's DTensor shards gathered: collective) on CPU."""
    if t is None:
        return None
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def run(out: str, dtype: str, parallel: str = "ddp", max_steps: int = 1, resume: str | None = None,
        **overrides) -> dict:
    tok = build_tokenizer()
    model = build_model(tok, TINY, seed=0).to(getattr(torch, dtype))
    train, test = make_task(TINY, seed=0)
    args = DashConfig(output_dir=out, max_steps=max_steps, prompts_per_step=4, group_size=4, parallel=parallel,
                      generation_batch_size=8, max_completion_tokens=8, max_prompt_tokens=16, scale_rewards="batch",
                      loss_agg="token-mean", max_grad_norm=None, learning_rate=LR, micro_batch_tokens=40,
                      report_to=[], disable_tqdm=True, eval_examples=6, resume=resume, **overrides)
    trainer = DashTrainer(model, half_constant_reward, args=args, train_dataset=train, eval_dataset=test,
                          processing_class=tok)
    grads = keep_grads(trainer, full)  # the last step's, gathered on every rank (the learner frees them after it)
    trainer.train()
    named = list(trainer.model.named_parameters())
    return {"grads": {n: grads.get(n) for n, _ in named}, "weights": {n: full(p) for n, p in named},
            "steps": [r for r in trainer.state.log_history if "loss" in r], "eval": trainer.eval_history,
            "world": trainer.dist.world_size, "sharded": trainer.fsdp_root is not None, "out": out}


def worker(rank: int, world: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    results = {}
    for name, overrides in CASES:
        for parallel in ("fsdp2", "ddp"):
            results[name, parallel] = run(os.path.join(out, f"{name}-{parallel}"), parallel=parallel, **overrides)
    # resume the float32 FSDP2 run from its step-1 checkpoint for one more step (full state -> shards)
    name, overrides = CASES[0]
    ckpt = os.path.join(out, f"{name}-fsdp2", "checkpoints", "step-1")
    results["resumed"] = run(os.path.join(out, "resumed"), parallel="fsdp2", max_steps=2, resume=ckpt, **overrides)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = str(tmp_path_factory.mktemp("fsdp"))
    mp.spawn(worker, args=(2, out, free_port()), nprocs=2, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one")
    return {name: run(str(out / name), **overrides) for name, overrides in CASES}


def assert_same_step(mine: dict, ref: dict, dtype: str) -> None:
    rec, one = mine["steps"][-1], ref["steps"][-1]
    for key in ("reward_mean", "kept_fraction", "completion_len_mean"):
        assert rec[key] == pytest.approx(one[key], rel=1e-6), key
    for key in ("loss", "grad_norm"):
        assert rec[key] == pytest.approx(one[key], rel=TOL[dtype]["rtol"], abs=TOL[dtype]["atol"]), key
    assert mine["grads"].keys() == ref["grads"].keys()
    for name, t in ref["grads"].items():
        torch.testing.assert_close(mine["grads"][name], t, **TOL[dtype], msg=f"grad {name}")
    for name, t in ref["weights"].items():
        torch.testing.assert_close(mine["weights"][name], t, **WEIGHTS_TOL, msg=f"weight {name}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fsdp2_two_ranks_equal_one_process_and_ddp(two_ranks, one_process, case):
    name, overrides = case
    one = one_process[name]
    assert one["world"] == 1 and one["steps"][-1]["loss"] != 0
    if overrides.get("filter_tau", 0.1) is not None:
        assert 0 < one["steps"][-1]["kept_fraction"] < 1  # the filter dropped some rows, kept some
    else:
        assert one["steps"][-1]["kept_fraction"] == 1
    for rank in two_ranks:
        fsdp, ddp = rank[name, "fsdp2"], rank[name, "ddp"]
        assert fsdp["sharded"] and not ddp["sharded"] and fsdp["world"] == ddp["world"] == 2
        assert_same_step(fsdp, one, overrides["dtype"])
        assert_same_step(fsdp, ddp, overrides["dtype"])
        assert [e["accuracy"] for e in fsdp["eval"]] == pytest.approx([e["accuracy"] for e in one["eval"]])


def test_fsdp2_checkpoint_is_a_hugging_face_model_and_resumes(two_ranks, one_process):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    name, overrides = CASES[0]
    ckpt = os.path.join(two_ranks[0][name, "fsdp2"]["out"], "checkpoints", "step-1")
    one_ckpt = os.path.join(one_process[name]["out"], "checkpoints", "step-1")
    files = {c: load_file(os.path.join(c, "model.safetensors")) for c in (ckpt, one_ckpt)}
    assert files[ckpt].keys() == files[one_ckpt].keys()  # the same tensors as save_pretrained's (tied ones once)
    saved = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).state_dict()
    weights = one_process[name]["weights"]
    assert set(weights) <= set(saved)
    for key, t in weights.items():
        torch.testing.assert_close(saved[key], t, **WEIGHTS_TOL, msg=key)
    resumed = two_ranks[0]["resumed"]
    assert [r["step"] for r in resumed["steps"]] == [1, 2]
    # the second step trained from the gathered weights and optimizer state: the weights moved on
    assert any(not torch.equal(resumed["weights"][k], two_ranks[0][name, "fsdp2"]["weights"][k]) for k in weights)
    assert resumed["steps"][1]["loss"] != 0


def cli_args(out: str) -> list[str]:
    """A two-step fsdp2 run of the embedded default, SFT-warmed enough that both steps' groups carry signal;
    one rank's rows per sampling call (16 = 4 prompts x 8 / 2 ranks), so one process samples its rows with
    the same seeds as the two ranks."""
    return ["train", "--output-dir", out, "--max-steps", "2", "sft.steps=40", "prompts_per_step=4",
            "generation_batch_size=16", "max_completion_tokens=8", "eval_examples=4", "tiny.n_train=40",
            "tiny.n_test=8", "parallel=fsdp2", "learning_rate=1e-3", "max_grad_norm=none", "cpu_threads=1"]


def test_two_torchrun_agents_nnodes_2_train_like_one_process(tmp_path):
    """The torchrun command of two nodes, both agents on this machine (c10d rendezvous): each node's one rank
    trains its half of the prompts; the steps' records and the saved weights equal one process's."""
    from dash_fast.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    endpoint = f"localhost:{free_port()}"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "dash",
                                "--node_rank", str(node), "-m", "dash_fast.cli", *cli_args(str(tmp_path / "two"))],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for node in range(2)]
    assert main(cli_args(str(tmp_path / "one"))) == 0  # meanwhile, one process (this one)
    logs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(log[-2000:] for log in logs)
    records = {}
    for run_ in ("one", "two"):
        with open(tmp_path / run_ / "metrics.jsonl") as f:
            records[run_] = [json.loads(line) for line in f]
    assert [r["step"] for r in records["two"]] == [1, 2]
    assert all(r["optimizer_steps"] == 1 and r["grad_norm"] > 0 for r in records["one"])  # both steps trained
    for mine, ref in zip(records["two"], records["one"]):
        for key in ("reward_mean", "kept_fraction", "completion_len_mean"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-6), (mine["step"], key)
        for key in ("loss", "grad_norm"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (mine["step"], key)
    from safetensors.torch import load_file

    saved = {r: load_file(str(tmp_path / r / "checkpoints" / "step-2" / "model.safetensors")) for r in ("one", "two")}
    assert saved["one"].keys() == saved["two"].keys()
    # two Adam steps of lr 1e-3 move every weight by up to 2e-3; float32 rounding of tiny gradients shows up
    # to ~3e-5 of that (WEIGHTS_TOL's reasoning; seen: 2.9e-5): 5% of the move
    for key, t in saved["one"].items():
        torch.testing.assert_close(saved["two"][key], t, rtol=0, atol=1e-4, msg=key)


# ----------------------------------------------------------------------------- exact resume under FSDP2


def untimed(record: dict) -> dict:
    """A step record without its wall-clock fields (time_*, tokens_per_s), which no two runs share."""
    return {k: v for k, v in record.items() if not k.startswith("time") and k != "tokens_per_s"}


def final(out: str, step: int = RESUME_STEPS) -> tuple[dict, dict, list[dict]]:
    """A run's checkpoint `step`: weights, optimizer state (by parameter index or name) and step records
    (untimed)."""
    from safetensors.torch import load_file

    from dash_fast.checkpoint import load_trainer_state

    ckpt = os.path.join(out, "checkpoints", f"step-{step}")
    state = load_trainer_state(ckpt)
    records = [untimed(r) for r in state["log_history"] if "loss" in r]
    return load_file(os.path.join(ckpt, "model.safetensors")), state["optimizer"], records


def continue_from(src: str, step: int, out: str) -> None:
    """`out` holds a copy of run `src`'s checkpoint `step` only: `--resume auto` picks it."""
    import shutil

    shutil.copytree(os.path.join(src, "checkpoints", f"step-{step}"), os.path.join(out, "checkpoints", f"step-{step}"))


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory) -> dict:
    """Two FSDP2 ranks straight; the same killed (rank 1 SIGKILLs itself scoring step 3, after the step-2
    checkpoint) then resumed; one process straight; an FSDP2 step-2 checkpoint continued in one process, and a
    one-process step-2 checkpoint continued on two FSDP2 ranks."""
    import time

    folder = str(tmp_path_factory.mktemp("fsdp-resume"))
    write_fault_rewards(folder)
    out = {name: os.path.join(folder, name) for name in ("straight", "killed", "one", "fsdp_to_one", "one_to_fsdp")}
    procs = {"straight": dash_run(folder, out["straight"])}
    t0 = time.time()
    procs["killed"] = dash_run(folder, out["killed"], fault="1:3:kill")
    with open(os.path.join(folder, "fault-time")) as f:
        kill_time = float(f.read())
    procs["exit_after_kill_s"] = time.time() - kill_time
    procs["killed_wall_s"] = time.time() - t0
    procs["resumed"] = dash_run(folder, out["killed"], "--resume", "auto")
    procs["one"] = dash_run(folder, out["one"], ranks=1)
    continue_from(out["straight"], 2, out["fsdp_to_one"])
    procs["fsdp_to_one"] = dash_run(folder, out["fsdp_to_one"], "--resume", "auto", ranks=1)
    continue_from(out["one"], 2, out["one_to_fsdp"])
    procs["one_to_fsdp"] = dash_run(folder, out["one_to_fsdp"], "--resume", "auto")
    for name in ("straight", "resumed", "one", "fsdp_to_one", "one_to_fsdp"):
        assert procs[name].returncode == 0, (name, procs[name].stderr[-3000:])
    return {"out": out, "procs": procs}


def test_fsdp2_kill_and_resume_is_bit_identical(resumed_runs):
    """Rank 1 SIGKILLed at step 3 of 4; `--resume auto` from step 2 ends with the weights, the AdamW state and
    the step records of the uninterrupted FSDP2 run, bit for bit (the same as one process's exact resume)."""
    out, procs = resumed_runs["out"], resumed_runs["procs"]
    assert procs["killed"].returncode != 0
    assert sorted(os.listdir(os.path.join(out["killed"], "checkpoints"))) == ["step-1", "step-2", "step-3", "step-4"]
    assert "resumed from" in procs["resumed"].stdout and "(step 2)" in procs["resumed"].stdout
    (wa, oa, ra), (wb, ob, rb) = final(out["straight"]), final(out["killed"])
    assert [r["step"] for r in ra] == list(range(1, RESUME_STEPS + 1))
    assert all(r["grad_norm"] > 0 for r in ra)  # every step moved the weights
    assert ra == rb  # every record, every float exactly (loss, grad_norm, rewards, lengths, ...)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weight {k}"
    assert all(isinstance(k, str) for k in oa["state"])  # FSDP2's full state: keyed by parameter name
    # the same hyperparameters; torch's set_optimizer_state_dict hands AdamW's betas back as a list
    assert [{**g, "betas": list(g["betas"])} for g in oa["param_groups"]] == \
        [{**g, "betas": list(g["betas"])} for g in ob["param_groups"]]
    assert oa["state"].keys() == ob["state"].keys()
    for name, moments in oa["state"].items():
        for k, t in moments.items():
            assert torch.equal(t, ob["state"][name][k]), f"optimizer {name}.{k}"


def test_a_killed_rank_takes_the_others_down_with_one_line(resumed_runs):
    """The SIGKILLed rank cannot speak: rank 0, whose next collective fails, names it and exits (no hang,
    no traceback of its own), and torchrun exits non-zero within seconds of the kill."""
    procs = resumed_runs["procs"]
    killed = procs["killed"]
    assert procs["exit_after_kill_s"] < 60, procs["exit_after_kill_s"]
    lines = [line for line in killed.stderr.splitlines() if line.startswith("dash-fast: rank")]
    assert len(lines) == 1 and lines[0].startswith("dash-fast: rank 0 stops: rank 1 (pid "), killed.stderr[-3000:]
    assert "without a Python error" in lines[0]
    assert "[rank0]: Traceback" not in killed.stderr


def assert_close_continuation(mine: str, ref: str) -> None:
    """Run `mine` continued another world size's checkpoint of step 2: its first two records are that run's,
    the next two and the final weights are `ref`'s to float32 rounding (a sum over ranks in another order)."""
    (wa, _, ra), (wb, _, rb) = final(ref), final(mine)
    assert [r["step"] for r in rb] == list(range(1, RESUME_STEPS + 1))
    for mine_r, ref_r in zip(rb[2:], ra[2:]):
        for key in ("reward_mean", "kept_fraction", "completion_len_mean"):
            assert mine_r[key] == pytest.approx(ref_r[key], rel=1e-6), (mine_r["step"], key)
        for key in ("loss", "grad_norm"):
            assert mine_r[key] == pytest.approx(ref_r[key], rel=1e-4, abs=1e-6), (mine_r["step"], key)
    for k, t in wa.items():  # 4 Adam steps of lr 1e-2 move a weight by up to 4e-2; rounding shows up to ~1e-4
        torch.testing.assert_close(wb[k], t, rtol=0, atol=1e-3, msg=k)


def test_fsdp2_checkpoint_resumes_in_one_process_and_back(resumed_runs):
    """The checkpoint holds the full (gathered) state, so either world size resumes the other's: the optimizer
    state is converted between FSDP2's keys (parameter names) and one process's (indices)."""
    out = resumed_runs["out"]
    assert_close_continuation(out["fsdp_to_one"], out["one"])
    assert_close_continuation(out["one_to_fsdp"], out["straight"])
    assert all(isinstance(k, int) for k in final(out["fsdp_to_one"])[1]["state"])  # saved as one process does
    assert all(isinstance(k, str) for k in final(out["one_to_fsdp"])[1]["state"])
    # the continued steps start from the other run's step-2 records (restored), not from scratch
    assert final(out["fsdp_to_one"])[2][:2] == final(out["straight"], 2)[2]
    assert final(out["one_to_fsdp"])[2][:2] == final(out["one"], 2)[2]


def test_a_rank_that_raises_takes_the_others_down_saying_which_and_why(tmp_path):
    """Rank 0 cannot write its first checkpoint (a file stands where checkpoints/ goes) while rank 1 waits
    at the barrier after it: rank 0 says why and exits, rank 1's collective fails and it names rank 0 and
    the reason (published in the store), and torchrun exits non-zero without waiting for a timeout."""
    import time

    write_fault_rewards(str(tmp_path))
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    t0 = time.time()
    proc = dash_run(str(tmp_path), str(out), timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 90
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dash-fast: rank")]
    why = f"FileExistsError: [Errno 17] File exists: '{out / 'checkpoints'}'"
    assert lines == [f"dash-fast: rank 0 failed: {why}", f"dash-fast: rank 1 stops: rank 0 failed: {why}"], \
        proc.stderr[-3000:]


def test_optimizer_state_converts_between_indices_and_names():
    """One process's AdamW state (keyed by index) as FSDP2's (by FSDPRoot name) and back, exactly; the
    loading optimizer keeps its own implementation flags; another model's state is refused in one line."""
    from dash_fast.checkpoint import CheckpointError, optimizer_state_for

    model = build_model(build_tokenizer(), TINY, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    saved = optimizer.state_dict()
    names = [f"model.{n}" for n, p in model.named_parameters()]
    sharded = torch.optim.AdamW(model.parameters(), lr=1e-3)  # as FSDP2's: not fused
    by_name = optimizer_state_for(saved, names, sharded, by_name=True)
    assert list(by_name["state"]) == names and by_name["param_groups"][0]["params"] == names
    assert by_name["param_groups"][0]["fused"] is None  # the loader's flag, not the saver's
    assert by_name["state"][names[3]]["exp_avg"] is saved["state"][3]["exp_avg"]
    back = optimizer_state_for(by_name, names, optimizer, by_name=False)
    assert back["state"].keys() == saved["state"].keys() and back["param_groups"] == saved["param_groups"]
    assert all(back["state"][i][k] is saved["state"][i][k] for i in saved["state"] for k in saved["state"][i])
    assert optimizer_state_for(saved, names, optimizer, by_name=False) is saved  # already in the loader's form
    with pytest.raises(CheckpointError, match="the optimizer state's parameters .* are not this model's"):
        optimizer_state_for(saved, names[:-1], sharded, by_name=True)
