"""Data parallelism on CPU (gloo): two ranks, each sampling half the prompts, give the same gradient,
rewards, filter and eval accuracy as one process on the whole rollout, with and without refill=True."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TINY_DDP as TINY
from helpers import free_port, half_constant_reward, keep_grads

from dash_fast import DashConfig, DashTrainer
from dash_fast.embedded.tiny import build_model, build_tokenizer, make_task


def run(out: str, refill: bool = False, overlap: bool = False, **overrides) -> dict:
    tok = build_tokenizer()
    model = build_model(tok, TINY, seed=0).double()
    train, test = make_task(TINY, seed=0)
    overrides = {"loss_impl": "naive", **overrides}
    args = DashConfig(output_dir=out, max_steps=2 if overlap else 1, prompts_per_step=4, group_size=4,
                      refill=refill, overlap=overlap,
                      # one group (refill) or one rank's rows per sampling chunk: the same seeds either way
                      generation_batch_size=4 if refill else 8,
                      max_completion_tokens=8, max_prompt_tokens=16, scale_rewards="batch",
                      loss_agg="token-mean", filter_tau=0.1, max_grad_norm=None, learning_rate=1e-2,
                      micro_batch_tokens=40, report_to=[], disable_tqdm=True, eval_examples=6, **overrides)
    trainer = DashTrainer(model, half_constant_reward, args=args, train_dataset=train, eval_dataset=test,
                          processing_class=tok)
    grads = keep_grads(trainer)  # the last step's (the learner frees them after it)
    trainer.train()
    return {"grads": dict(grads),
            "record": trainer.state.log_history[-1], "eval": trainer.eval_history,
            "steps": [r for r in trainer.state.log_history if "loss" in r],
            "world": trainer.dist.world_size}


def worker(rank: int, world: int, out: str, port: int, refill: bool, overlap: bool, overrides: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = run(out, refill, overlap, **overrides)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def spawn_two_ranks(out: str, refill: bool = False, overlap: bool = False, **overrides) -> list[dict]:
    mp.spawn(worker, args=(2, out, free_port(), refill, overlap, overrides), nprocs=2, join=True)
    return [{**torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False), "out": out} for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return spawn_two_ranks(str(tmp_path_factory.mktemp("ddp")))


def assert_same_as_one_process(two_ranks: list[dict], one: dict) -> None:
    assert one["world"] == 1 and two_ranks[0]["world"] == 2
    for key in ("reward_mean", "reward_std", "kept_fraction", "completion_len_mean", "loss"):
        assert two_ranks[0]["record"][key] == pytest.approx(one["record"][key], rel=1e-6), key
    for rank in two_ranks:
        assert rank["grads"].keys() == one["grads"].keys()
        for name, g in one["grads"].items():
            # the loss takes log-softmax in float32: agreement to float32 rounding, not bit for bit
            torch.testing.assert_close(rank["grads"][name], g, rtol=1e-5, atol=1e-8, msg=name)
    assert [e["accuracy"] for e in two_ranks[1]["eval"]] == pytest.approx([e["accuracy"] for e in one["eval"]])


def test_two_ranks_give_the_gradient_of_one_process_on_the_whole_batch(two_ranks, tmp_path):
    one = run(str(tmp_path))
    assert 0 < one["record"]["kept_fraction"] < 1  # the filter dropped some rows, kept some
    assert_same_as_one_process(two_ranks, one)


def test_refill_under_two_ranks_trains_on_the_rows_of_one_process(tmp_path):
    """Each refill round is split over the ranks like the first rollout; the ranks all-gather rewards and
    lengths, cut at the same row and train on their own rows of the joined batch."""
    one = run(str(tmp_path / "one"), refill=True)
    rec = one["record"]
    assert rec["refill_rounds"] >= 1 and rec["refill_rows"] > 0
    two = spawn_two_ranks(str(tmp_path / "two"), refill=True)
    for key in ("refill_rounds", "refill_rows", "refill_rows_unused"):
        # (under torchrun a round's prompts are rounded up to a multiple of the world size: this holds
        # when one process drew an even number in each round, as it does for this seed)
        assert two[0]["record"][key] == two[1]["record"][key] == rec[key], key
    assert_same_as_one_process(two, one)


def test_only_rank_zero_writes_checkpoints_and_metrics(two_ranks):
    out = two_ranks[0]["out"]
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-1"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 1


def test_refill_with_overlap_under_two_ranks_trains_on_the_rows_of_one_process(tmp_path):
    """Two steps with overlap: step 1 refills and then samples step 2's rollout ahead; step 2 trains on that
    rollout (lag 1) plus its own refill rounds. Same rows, rewards and gradient as one process. Only the
    number of rounds may differ: a one-prompt round is rounded up to one prompt per rank, so two ranks can
    draw in fewer rounds the same prompts (with the same seeds) that one process draws one at a time."""
    one = run(str(tmp_path / "one"), refill=True, overlap=True)
    two = spawn_two_ranks(str(tmp_path / "two"), refill=True, overlap=True)
    assert [r["rollout_lag"] for r in one["steps"]] == [0, 1]
    assert all(r["refill_rounds"] >= 1 for r in one["steps"])
    for rank in two:
        assert len(rank["steps"]) == 2
        for mine, ref in zip(rank["steps"], one["steps"]):
            for key in ("refill_rows", "refill_rows_unused", "rollout_lag"):
                assert mine[key] == ref[key], key
            assert 1 <= mine["refill_rounds"] <= ref["refill_rounds"]
            for key in ("reward_mean", "kept_fraction", "loss"):
                assert mine[key] == pytest.approx(ref[key], rel=1e-6), key
    assert_same_as_one_process(two, one)


def test_two_ranks_on_the_default_fused_loss_with_kl_and_minibatches(tmp_path):
    """The default loss_impl=fused under DDP, with beta > 0 and two minibatches (tokens clip in the second):
    the same records and gradient as one process, and plain-number records on every rank."""
    from plain_json import assert_plain_numbers, read_jsonl

    fused = dict(loss_impl="fused", beta=0.04, minibatches=2)
    one = run(str(tmp_path / "one"), **fused)
    two = spawn_two_ranks(str(tmp_path / "two"), **fused)
    assert one["record"]["kl"] > 0 and one["record"]["optimizer_steps"] == 2
    for key in ("kl", "clip_fraction"):
        assert two[0]["record"][key] == pytest.approx(one["record"][key], rel=1e-5, abs=1e-7), key
    assert_same_as_one_process(two, one)
    for rank in two:
        assert_plain_numbers(rank["record"])
    assert [r["step"] for r in read_jsonl(os.path.join(two[0]["out"], "metrics.jsonl"))] == [1]


# ----------------------------------------------------------------------------- a failing rank


def hang_worker(rank: int, world: int, out: str, port: int) -> None:
    """Rank 1 stops taking part (sleeps); rank 0's collective times out after dist_timeout_s and says so."""
    import contextlib
    import io
    import time

    from dash_fast.runtime import distributed as ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    info = ddp.init_distributed("cpu", timeout_s=2.0)
    ddp.barrier(info)
    err, t0, code = io.StringIO(), time.time(), None
    with contextlib.redirect_stderr(err):
        try:
            with ddp.fail_fast(info):
                if rank == 1:
                    time.sleep(8)
                ddp.all_reduce_sum(1.0, info)
        except SystemExit as e:
            code = e.code
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(f"{time.time() - t0}\n{code}\n{err.getvalue()}")


def test_a_rank_that_stops_taking_part_times_the_others_out(tmp_path):
    mp.spawn(hang_worker, args=(2, str(tmp_path), free_port()), nprocs=2, join=True)
    seconds, code, message = (tmp_path / "rank0.txt").read_text().split("\n", 2)
    assert float(seconds) < 6  # dist_timeout_s=2 (+ 1 s waiting for a published reason), not torch's 30 min
    assert code == "1" and message.startswith("dash-fast: rank 0 stops: a collective timed out (dist_timeout_s)")
    assert message.count("\n") == 1


def exit_worker(rank: int, world: int, out: str, port: int) -> None:
    """Join through init_distributed, all-reduce, then run what interpreter exit runs (atexit's functions)."""
    import atexit

    from dash_fast.runtime import distributed as ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    info = ddp.init_distributed("cpu")
    total = ddp.all_reduce_sum(1.0, info)
    atexit._run_exitfuncs()
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(f"{total} {dist.is_initialized()}")


def test_exit_destroys_the_process_group_it_joined(tmp_path):
    """Left to interpreter teardown, gloo's threads abort a rank at exit now and then (SIGABRT: "terminate
    called without an active exception"); the process group init_distributed joined is destroyed at exit."""
    mp.spawn(exit_worker, args=(2, str(tmp_path), free_port()), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["2.0 False"] * 2
