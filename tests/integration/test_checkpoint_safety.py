"""A checkpoint is data, never code: resume reads the state from JSON + safetensors, the weights from
safetensors only, and a previous-format trainer_state.pt through torch's restricted unpickler. A pickle
planted in any file resume reads is refused with one line and never runs (a marker file it would create
stays absent); planted beside a valid checkpoint it is never opened.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT

from dash_fast import DashConfig, DashTrainer
from dash_fast.checkpoint import (
    LEGACY_STATE,
    STATE_JSON,
    STATE_SHARD,
    TAG,
    CheckpointError,
    load_trainer_state,
    load_weights,
    rng_state,
    save_state,
    set_rng_state,
)
from dash_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer, make_task

TINY = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_terms=2, max_operand=9,
                  n_train=24, n_test=4)


class Planted:
    """Pickles as a call to os.system that creates `marker`: what a hostile checkpoint file holds."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(file: str, marker: str, how: str = "torch") -> None:
    payload = {"optimizer": Planted(marker), "step": 1}
    if how == "torch":
        torch.save(payload, file)
    else:
        with open(file, "wb") as f:
            pickle.dump(payload, f)


def same(a, b) -> bool:
    """Equal values of the same types all the way down (tuple is not list, 1 is not '1', NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


# ----------------------------------------------------------------------------- the format


@pytest.mark.parametrize("shard_bytes", [64, None])  # a shard per few tensors | all in one shard
def test_resume_state_round_trips_exactly(tmp_path, shard_bytes):
    shared, buffer = torch.arange(6.0), torch.arange(10.0)
    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                      "param_groups": [{"betas": (0.9, 0.99), "params": [0], "foreach": None, "fused": False}]},
        "rng": rng_state(),
        "tensors": [torch.randn(4, dtype=torch.bfloat16), torch.tensor([True, False]), torch.randn(3, 2).t(),
                    torch.zeros(0), torch.randint(0, 255, (5,), dtype=torch.uint8)],
        "aliases": [shared, shared],
        "overlapping views": [buffer[:6], buffer[4:]],
        "floats": [float("nan"), float("inf"), -float("inf"), 1e-300, 0.1],
        "numpy": [np.float64(0.5), np.int64(7)],
        TAG: {"a dict using the tag as a key": ("x", 1)},
        "mixed keys": {1: "one", "1": "string one", (2, 3): None},
        "log_history": [{"step": 1, "loss": -0.25, "text": "é ✓"}],
    }
    save_state(state, str(tmp_path), **({"shard_bytes": shard_bytes} if shard_bytes else {}))
    shards = len([n for n in os.listdir(tmp_path) if STATE_SHARD.match(n)])
    assert shards > 2 if shard_bytes else shards == 1
    loaded = load_trainer_state(str(tmp_path))
    expected = {**state, "numpy": [0.5, 7]}  # numpy scalars come back as Python numbers
    assert same(loaded, expected)
    assert loaded["aliases"][0] is loaded["aliases"][1]  # one tensor on disk and after loading
    set_rng_state(loaded["rng"])  # every RNG stream continues where it was saved
    draws = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(state["rng"])
    assert same(draws, (random.random(), np.random.rand(), torch.rand(1)))


def test_state_files_are_only_its_own_shards(tmp_path):
    save_state({"step": 3, "log_history": []}, str(tmp_path))  # no tensors: no shard
    assert load_trainer_state(str(tmp_path)) == {"step": 3, "log_history": []}
    doc = json.load(open(tmp_path / STATE_JSON))
    assert doc["files"] == []
    json.dump({**doc, "files": ["../../elsewhere.safetensors"]}, open(tmp_path / STATE_JSON, "w"))
    with pytest.raises(CheckpointError, match="'../../elsewhere.safetensors' is not a resume_state shard name"):
        load_trainer_state(str(tmp_path))


def test_state_that_is_not_plain_data_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match=r"state\.scheduler\.fn is a function, not plain data"):
        save_state({"scheduler": {"fn": lambda step: 1.0}}, str(tmp_path))


# ----------------------------------------------------------------------------- resume from a real run


def make_trainer(out, **overrides) -> DashTrainer:
    tok = build_tokenizer()
    train, _ = make_task(TINY, seed=0)
    args = dict(output_dir=str(out), max_steps=2, save_steps=1, prompts_per_step=2, group_size=4, seed=1,
                max_completion_tokens=6, max_prompt_tokens=16, report_to=[], disable_tqdm=True, learning_rate=1e-2,
                filter_tau=None)
    args.update(overrides)
    return DashTrainer(build_model(tok, TINY, seed=0), lambda completions, **kw: [float(len(c) % 3) for c in completions],
                       args=DashConfig(**args), train_dataset=train, processing_class=tok)


def params(trainer: DashTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run saving at each step: its step-1 checkpoint, and its final parameters."""
    out = tmp_path_factory.mktemp("run")
    trainer = make_trainer(out)
    trainer.train()
    return str(out / "checkpoints" / "step-1"), params(trainer)


def drop_resume_state(path: str) -> None:
    """Leave a checkpoint without its current-format state (as the previous format wrote it)."""
    for name in os.listdir(path):
        if name == STATE_JSON or STATE_SHARD.match(name):
            os.remove(os.path.join(path, name))


def copy_of(ckpt: str, dest) -> str:
    path = str(dest / "step-1")
    shutil.copytree(ckpt, path)
    return path


def resume_from(path: str, out) -> DashTrainer:
    trainer = make_trainer(out, resume=path)
    trainer.train()
    return trainer


def assert_refused(tmp_path, path: str, marker: str, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as err:
        resume_from(path, tmp_path / "resumed")
    assert "\n" not in str(err.value)
    assert not os.path.exists(marker), "the planted pickle ran"


@pytest.mark.parametrize("how, what", [("torch", r"calls posix\.system"), ("pickle", "is not plain data")])
def test_planted_trainer_state_pickle_is_refused_and_never_runs(run, tmp_path, how, what):
    path, marker = copy_of(run[0], tmp_path), str(tmp_path / "PWNED")
    drop_resume_state(path)
    plant(os.path.join(path, LEGACY_STATE), marker, how)
    assert_refused(tmp_path, path, marker, rf"refusing .*trainer_state\.pt: a pickle that {what}")


def test_planted_weights_pickle_is_refused_and_never_runs(run, tmp_path):
    path, marker = copy_of(run[0], tmp_path), str(tmp_path / "PWNED")
    os.remove(os.path.join(path, "model.safetensors"))
    plant(os.path.join(path, "pytorch_model.bin"), marker)
    assert_refused(tmp_path, path, marker, r"no model\.safetensors \(it holds pytorch_model\.bin, a pickle")


def test_planted_adapter_pickle_is_refused_and_never_runs(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(build_tokenizer(), TINY), LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.save_pretrained(str(tmp_path))  # adapter_config.json + adapter_model.safetensors
    save_state({"optimizer": optimizer.state_dict()}, str(tmp_path))
    load_weights(str(tmp_path), model, optimizer)  # the checkpoint as written loads
    marker = str(tmp_path / "PWNED")
    os.remove(tmp_path / "adapter_model.safetensors")
    plant(str(tmp_path / "adapter_model.bin"), marker)
    with pytest.raises(CheckpointError, match=r"no adapter_model\.safetensors \(it holds adapter_model\.bin"):
        load_weights(str(tmp_path), model, optimizer)
    assert not os.path.exists(marker)


def test_pickles_beside_a_valid_checkpoint_are_never_opened_and_resume_is_exact(run, tmp_path):
    path, marker = copy_of(run[0], tmp_path), str(tmp_path / "PWNED")
    for name in (LEGACY_STATE, "pytorch_model.bin", "optimizer.pt", "rng_state.pth"):
        plant(os.path.join(path, name), marker)
    resumed = params(resume_from(path, tmp_path / "resumed"))
    assert not os.path.exists(marker)
    assert all(torch.equal(resumed[k], v) for k, v in run[1].items())


def test_previous_format_checkpoint_still_resumes_exactly(run, tmp_path):
    """trainer_state.pt as the previous dash-fast wrote it (torch.save of the same dict, numpy RNG state
    included) loads through the restricted unpickler, and the run continues bit for bit."""
    path = copy_of(run[0], tmp_path)
    state = load_trainer_state(path)
    assert isinstance(state["rng"]["numpy"][1], np.ndarray)
    torch.save(state, os.path.join(path, LEGACY_STATE))
    drop_resume_state(path)
    assert same(load_trainer_state(path), state)
    resumed = params(resume_from(path, tmp_path / "resumed"))
    assert all(torch.equal(resumed[k], v) for k, v in run[1].items())


def test_cli_resume_from_a_planted_checkpoint_is_a_one_line_error(run, tmp_path):
    path, marker = copy_of(run[0], tmp_path), str(tmp_path / "PWNED")
    drop_resume_state(path)
    plant(os.path.join(path, LEGACY_STATE), marker)
    root = str(REPO_ROOT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "kernels")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dash_fast.cli", "train", "--output-dir", str(tmp_path / "cli"),
                           "--resume", path, "--max-steps", "2", "sft.steps=0", "tiny.hidden_size=32",
                           "tiny.num_layers=1", "tiny.num_heads=2", "tiny.intermediate_size=64", "tiny.n_train=16",
                           "tiny.n_test=4", "eval_examples=4", "prompts_per_step=2", "max_completion_tokens=4",
                           "report_to=[]", "disable_tqdm=true"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("dash-fast: error: refusing "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(marker)


def test_trl_resume_from_a_planted_checkpoint_is_refused(run, tmp_path):
    from datasets import Dataset

    from dash_fast import GRPOConfig, GRPOTrainer

    path, marker = copy_of(run[0], tmp_path), str(tmp_path / "PWNED")
    drop_resume_state(path)
    plant(os.path.join(path, LEGACY_STATE), marker)
    tok = build_tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, max_steps=2, report_to="none", disable_tqdm=True)
    trainer = GRPOTrainer(model=build_model(tok, TINY), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": f"{i}+1="} for i in range(4)]),
                          processing_class=tok)
    with pytest.raises(CheckpointError, match="refusing .*calls posix.system"):
        trainer.train(resume_from_checkpoint=path)
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------- a checkpoint written by FSDP2


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """The step-1 checkpoint of a 2-rank FSDP2 run under torchrun (gloo): its full state gathered on rank 0."""
    from cli_runs import dash_run, write_fault_rewards

    folder = str(tmp_path_factory.mktemp("fsdp2-ckpt"))
    write_fault_rewards(folder)
    proc = dash_run(folder, os.path.join(folder, "run"), "--max-steps", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, os.path.join(folder, "run", "checkpoints", "step-1")


def resume_fsdp2(folder: str, path: str, out: str) -> subprocess.CompletedProcess:
    from cli_runs import dash_run

    return dash_run(folder, out, "--resume", path, "--max-steps", "2", timeout=180)


def plant_trainer_state(path: str, marker: str) -> None:
    drop_resume_state(path)
    plant(os.path.join(path, LEGACY_STATE), marker)


def plant_weights(path: str, marker: str) -> None:
    os.remove(os.path.join(path, "model.safetensors"))
    plant(os.path.join(path, "pytorch_model.bin"), marker)


def plant_state_shard(path: str, marker: str) -> None:
    """The sharded resume state: a pickle under a resume_state shard's name."""
    shards = sorted(n for n in os.listdir(path) if STATE_SHARD.match(n))
    assert shards
    plant(os.path.join(path, shards[0]), marker)


def plant_weights_shard(path: str, marker: str) -> None:
    plant(os.path.join(path, "model.safetensors"), marker)


@pytest.mark.parametrize("planter, refusal", [
    (plant_trainer_state, r"refusing .*trainer_state\.pt: a pickle that calls posix\.system"),
    (plant_weights, r"refusing .*: no model\.safetensors \(it holds pytorch_model\.bin, a pickle"),
    (plant_state_shard, r"refusing .*resume_state-00000\.safetensors: a file that is not safetensors"),
    (plant_weights_shard, r"refusing .*step-1: a file that is not safetensors"),
], ids=["trainer_state", "weights", "state_shard", "weights_file"])
def test_fsdp2_checkpoint_with_a_planted_pickle_is_refused_on_every_rank(fsdp2_run, tmp_path, planter, refusal):
    """Each file resume reads in a 2-rank FSDP2 checkpoint, replaced by a pickle that would run os.system:
    both ranks refuse it in one line (main's `dash-fast: error:`), nothing runs, no traceback, torchrun fails."""
    import re

    folder, ckpt = fsdp2_run
    path, marker = copy_of(ckpt, tmp_path), str(tmp_path / "PWNED")
    planter(path, marker)
    proc = resume_fsdp2(folder, path, str(tmp_path / "resumed"))
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("dash-fast: error: refusing ")]
    assert len(refusals) == 2 and all(re.search(refusal, line) for line in refusals), proc.stderr[-3000:]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith("dash-fast: rank")]  # not a crash
    assert not os.path.exists(marker), "the planted pickle ran"


def test_fsdp2_checkpoint_resumes_past_pickles_it_never_opens(fsdp2_run, tmp_path):
    """Pickles beside a valid FSDP2 checkpoint (the names torch.distributed.checkpoint and HF Trainer use
    included) are never opened: both ranks resume and train the next step."""
    folder, ckpt = fsdp2_run
    path, marker = copy_of(ckpt, tmp_path), str(tmp_path / "PWNED")
    for name in (LEGACY_STATE, "pytorch_model.bin", "optimizer.pt", "rng_state.pth", "__0_0.distcp", "__1_0.distcp"):
        plant(os.path.join(path, name), marker)
    plant(os.path.join(path, ".metadata"), marker, how="pickle")  # torch.save refuses the name
    proc = resume_fsdp2(folder, path, str(tmp_path / "resumed"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and os.path.isdir(tmp_path / "resumed" / "checkpoints" / "step-2")
    assert not os.path.exists(marker)
