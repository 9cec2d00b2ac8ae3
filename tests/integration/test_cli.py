"""`dash-fast train` end to end on a very small embedded setting: every output the issue lists."""

import json
import os
import subprocess
import sys

import pytest

SMALL = ["--max-steps", "2", "sft.steps=3", "eval_examples=16", "tiny.n_train=200", "tiny.n_test=32",
         "prompts_per_step=4", "max_completion_tokens=12", "save_steps=1"]
METRIC_KEYS = ("step", "reward_mean", "reward_std", "accuracy", "kept_fraction", "clip_fraction", "kl",
               "entropy", "completion_len_mean", "time_generate_s", "time_train_s", "time_step_s",
               "tokens_per_s")


def dash_fast(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dash_fast.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = dash_fast("train", "--output-dir", str(out), "--seed", "3", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_train_writes_metrics_for_every_step(run_dir):
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, missing


def test_train_writes_summary(run_dir):
    summary = json.load(open(run_dir / "summary.json"))
    for key in ("eval_accuracy_initial", "eval_accuracy_final", "eval_examples", "steps", "wall_time_s",
                "rl_wall_time_s"):
        assert key in summary, key
    assert summary["steps"] == 2 and summary["eval_examples"] == 16
    assert 0 <= summary["eval_accuracy_final"] <= 1
    assert summary["wall_time_s"] >= summary["rl_wall_time_s"] > 0
    config = json.load(open(run_dir / "config.json"))
    assert config["max_steps"] == 2 and config["sft"]["steps"] == 3 and config["seed"] == 3


def test_train_writes_models_data_plots_and_events(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for model_dir in (run_dir / "sft_model", run_dir / "checkpoints" / "step-1", run_dir / "checkpoints" / "step-2"):
        assert (model_dir / "config.json").exists(), model_dir
        tok = AutoTokenizer.from_pretrained(model_dir)
        assert tok.decode(tok("12+7=", add_special_tokens=False)["input_ids"]) == "12+7="
    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-2")
    for split in ("train", "test"):
        rows = [json.loads(line) for line in open(run_dir / "data" / f"{split}.jsonl")]
        assert rows and {"prompt", "answer"} <= rows[0].keys()
    train = {json.loads(line)["prompt"] for line in open(run_dir / "data" / "train.jsonl")}
    test = {json.loads(line)["prompt"] for line in open(run_dir / "data" / "test.jsonl")}
    assert not train & test
    for plot in ("reward", "accuracy", "kept_fraction", "time_split"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tensorboard"))


def test_eval_command_scores_a_checkpoint(run_dir, tmp_path):
    proc = dash_fast("eval", str(run_dir / "checkpoints" / "step-2"), "--dataset",
                     str(run_dir / "data" / "test.jsonl"), "--max-examples", "8", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(tmp_path / "eval.json"))
    assert result["eval_examples"] == 8 and 0 <= result["eval_accuracy"] <= 1


def test_unknown_config_key_is_a_one_line_error(tmp_path):
    proc = dash_fast("train", "--output-dir", str(tmp_path), "learning_rat=1e-4")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "learning_rat" in proc.stderr and "learning_rate" in proc.stderr


def test_overrides_and_flags_parse_in_any_order():
    from dash_fast.cli import build_config, parse_args

    orders = [
        ["train", "engine=vllm", "--max-steps", "3", "sft.steps=0", "--seed", "2", "--tau", "none"],
        ["train", "--max-steps", "3", "engine=vllm", "--seed", "2", "sft.steps=0", "--tau", "none"],
        ["train", "--max-steps", "3", "--seed", "2", "--tau", "none", "engine=vllm", "sft.steps=0"],
    ]
    configs = [build_config(parse_args(argv)) for argv in orders]
    for cfg in configs:
        assert (cfg.engine, cfg.max_steps, cfg.seed, cfg.sft.steps, cfg.filter_tau) == ("vllm", 3, 2, 0, None)
    ns = parse_args(["eval", "ckpt", "eval_examples=4", "--dataset", "d.jsonl", "temperature=0.5"])
    assert (ns.checkpoint, ns.dataset, ns.overrides) == ("ckpt", "d.jsonl", ["eval_examples=4", "temperature=0.5"])


def test_help_lists_every_config_key():
    import dataclasses

    from dash_fast.config import DashConfig

    proc = dash_fast("train", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for f in dataclasses.fields(DashConfig):
        value = getattr(DashConfig(), f.name)
        names = [f"{f.name}.{g.name}" for g in dataclasses.fields(value)] if dataclasses.is_dataclass(value) \
            else [f.name]
        for name in names:
            assert f" {name}=" in text, name
