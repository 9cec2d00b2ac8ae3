"""Sampler vs trainer agreement is visible: every step record carries TRL's
`sampling/sampling_logp_difference/{mean,max}` (from the old-log-prob pass when one runs, else from the loss
forward of the step's first optimizer step), and the start-up line and summary.json name the rollout engine
path and the training forward that ran. Tiny local models only."""

import json
import math

import pytest
import torch
from helpers import make_one_step_trainer as make_trainer
from helpers import shifted_sampler

from dash_fast.metrics import LOGP_DIFF_MAX, LOGP_DIFF_MEAN

SHIFT = 0.5


@pytest.mark.parametrize("loss_impl", ["fused", "naive"])
@pytest.mark.parametrize("K", [1, 2])
def test_step_record_reports_the_sampler_trainer_difference(tmp_path, loss_impl, K):
    """fp32, same weights: the difference is float rounding (the engine's static path vs the training forward);
    with the sampler's log-probs shifted by SHIFT it reports SHIFT (mean and max), so it measures the sampler."""
    trainer = make_trainer(tmp_path / "agree", loss_impl=loss_impl, updates_per_rollout=K)
    record = trainer.train_step(1)
    assert record["no_signal"] == 0
    assert 0 <= record[LOGP_DIFF_MEAN] <= record[LOGP_DIFF_MAX] <= 1e-4

    trainer = make_trainer(tmp_path / "shifted", loss_impl=loss_impl, updates_per_rollout=K,
                           rollout_engine=shifted_sampler(SHIFT))
    record = trainer.train_step(1)
    assert record[LOGP_DIFF_MEAN] == pytest.approx(SHIFT, abs=1e-4)
    assert record[LOGP_DIFF_MAX] == pytest.approx(SHIFT, abs=1e-4)


def test_only_the_first_optimizer_step_measures_without_an_old_pass(tmp_path):
    """K = 1, M = 2: the old pass runs and measures every kept row at the sampled weights. A measurement in a
    later minibatch (after the weights moved) would differ from it; the learning rate here makes it."""
    trainer = make_trainer(tmp_path, minibatches=2, learning_rate=0.5, loss_impl="naive", dtype=torch.float64)
    record = trainer.train_step(1)
    assert record[LOGP_DIFF_MAX] < 1e-5  # the rollout keeps float32 log-probs


def test_a_step_without_a_forward_reports_nan(tmp_path):
    trainer = make_trainer(tmp_path, reward=lambda prompts, completions, **kw: [1.0] * len(completions))
    record = trainer.train_step(1)
    assert record["no_signal"] == 1
    assert math.isnan(record[LOGP_DIFF_MEAN]) and math.isnan(record[LOGP_DIFF_MAX])


def test_start_up_line_and_summary_name_the_paths(tmp_path, capsys):
    trainer = make_trainer(tmp_path)
    out = capsys.readouterr().out
    trainer.train()
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["engine_path"].startswith("torch static fast path (")  # + its GEMM path
    assert f"dash-fast: rollout engine: {summary['engine_path']}; training forward: shared-prompt" in out
    assert summary["train_forward_path"] == "shared-prompt"
    records = [json.loads(r) for r in open(tmp_path / "metrics.jsonl")]
    assert all(LOGP_DIFF_MEAN in r and LOGP_DIFF_MAX in r for r in records)


def test_the_dynamic_fallback_is_announced_with_its_reason(tmp_path, capsys):
    trainer = make_trainer(tmp_path)
    trainer.engine.kv_cache = "dynamic"
    assert trainer.paths()["engine_path"] == "torch dynamic fallback (kv_cache='dynamic')"
    trainer.engine.kv_cache = "auto"
    trainer.model.config.model_type = "not-a-family"
    assert trainer.paths()["engine_path"].startswith("torch dynamic fallback (model_type 'not-a-family' is not one")
