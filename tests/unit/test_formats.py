from __future__ import annotations

import json
import os

import pytest
from helpers import TEST_DATA, TINY_MODEL

from dash_fast.data.formats import (
    adapt_dataset,
    adapt_gsm8k,
    adapt_math,
    adapt_mbpp,
    adapt_rows,
    detect_format,
    load_formatted,
    to_chat,
)
from dash_fast.rewards import code_reward, math_reward

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when datasets is first imported (lazily, below)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def read_jsonl(name: str) -> list[dict]:
    with open(TEST_DATA / name) as f:
        return [json.loads(line) for line in f]


def test_samples_have_ten_rows_and_real_field_names():
    assert [sorted(read_jsonl(n)[0]) for n in ("gsm8k_sample.jsonl", "math_sample.jsonl")] == [
        ["answer", "question"],
        ["level", "problem", "solution", "type"],
    ]
    assert {"task_id", "text", "code", "test_list"} <= read_jsonl("mbpp_sample.jsonl")[0].keys()
    assert all(
        len(read_jsonl(n)) == 10 for n in ("gsm8k_sample.jsonl", "math_sample.jsonl", "mbpp_sample.jsonl")
    )


def test_detect_format():
    assert detect_format(["question", "answer"]) == "gsm8k"
    assert detect_format(["problem", "solution", "level", "type"]) == "math"
    assert detect_format(["task_id", "text", "code", "test_list"]) == "mbpp"
    assert detect_format(["prompt", "test_list", "test_imports"]) == "mbpp"  # MBPP sanitized
    assert detect_format(["prompt", "answer"]) is None  # already standard
    assert detect_format(["foo"]) is None


def test_gsm8k_rows():
    rows = adapt_rows(read_jsonl("gsm8k_sample.jsonl"))
    assert [r["answer"] for r in rows] == ["12", "210", "180", "55", "6", "30", "26", "84", "1080", "-5"]
    assert rows[0]["solution"].endswith("#### 12") and rows[0]["question"] in rows[0]["prompt"]
    assert "####" in rows[0]["prompt"]  # the instruction tells the model how to answer


def test_math_rows_nested_braces():
    rows = adapt_rows(read_jsonl("math_sample.jsonl"))
    assert [r["answer"] for r in rows[:3]] == ["\\frac{5}{6}", "6", "5\\sqrt{2}"]
    assert rows[-1]["answer"] == "(4, 3)"
    assert rows[0]["level"] == "Level 1" and "\\boxed{}" in rows[0]["prompt"]


def test_mbpp_rows():
    rows = adapt_rows(read_jsonl("mbpp_sample.jsonl"))
    row = rows[0]
    assert row["test_list"][0] in row["prompt"] and row["text"] in row["prompt"]
    assert row["test_list"][1] not in row["prompt"]  # only the first test is shown
    assert row["task_id"] == 601 and row["answer"] == row["code"]


def test_reference_solutions_score_full_reward():
    """The samples are consistent with the rewards: gold solutions get 1.0."""
    gsm8k = adapt_rows(read_jsonl("gsm8k_sample.jsonl"))
    assert (
        math_reward(
            [r["prompt"] for r in gsm8k], [r["solution"] for r in gsm8k], answer=[r["answer"] for r in gsm8k]
        )
        == [1.0] * 10
    )
    math_rows = adapt_rows(read_jsonl("math_sample.jsonl"))
    assert (
        math_reward(["p"] * 10, [r["solution"] for r in math_rows], answer=[r["answer"] for r in math_rows])
        == [1.0] * 10
    )
    mbpp = adapt_rows(read_jsonl("mbpp_sample.jsonl"))
    completions = [f"```python\n{r['code']}\n```" for r in mbpp]
    assert code_reward(["p"] * 10, completions, test_list=[r["test_list"] for r in mbpp]) == [1.0] * 10


@pytest.mark.parametrize(
    "adapter, row, message",
    [
        (adapt_gsm8k, {"answer": "#### 1"}, r"row 3: missing column 'question'"),
        (adapt_gsm8k, {"question": 5, "answer": "#### 1"}, r"row 3: column 'question' must be str, got int"),
        (adapt_gsm8k, {"question": "q", "answer": "no marker"}, r"row 3: column 'answer' has no '####"),
        (
            adapt_math,
            {"problem": "p", "solution": "no box"},
            r"row 3: column 'solution' has no complete \\boxed",
        ),
        (adapt_math, {"problem": "p", "solution": "\\boxed{1"}, r"row 3: column 'solution'"),
        (
            adapt_mbpp,
            {"text": "t", "test_list": "assert 1"},
            r"row 3: column 'test_list' must be list or tuple, got str",
        ),
        (adapt_mbpp, {"text": "t", "test_list": []}, r"row 3: column 'test_list' must be a non-empty list"),
        (adapt_mbpp, {"test_list": ["assert 1"]}, r"row 3: missing column 'prompt'"),
    ],
)
def test_malformed_rows_name_row_and_column(adapter, row, message):
    with pytest.raises(ValueError, match=message):
        adapter(row, 3)


def test_malformed_row_in_a_list_names_its_index():
    rows = read_jsonl("gsm8k_sample.jsonl")
    rows[7] = {"question": rows[7]["question"], "answer": None}
    with pytest.raises(ValueError, match="row 7: missing column 'answer'"):
        adapt_rows(rows)


def test_to_chat():
    assert to_chat("hi") == [{"role": "user", "content": "hi"}]
    assert to_chat("hi", "be brief") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert to_chat(msgs, "other") == msgs
    with pytest.raises(ValueError, match="prompt must be a str"):
        to_chat([{"content": "no role"}])


@pytest.mark.parametrize("name", ["gsm8k_sample.jsonl", "gsm8k_sample.parquet"])
def test_load_formatted_offline(name, tmp_path):
    ds = load_formatted(str(TEST_DATA / name), cache_dir=str(tmp_path))
    assert (
        len(ds) == 10
        and ds[0]["answer"] == "12"
        and {"prompt", "answer", "solution", "question"} <= set(ds.column_names)
    )


def test_load_formatted_mbpp_chat(tmp_path):
    ds = load_formatted(
        str(TEST_DATA / "mbpp_sample.jsonl"), chat=True, system_prompt="You write Python.", cache_dir=str(tmp_path)
    )
    assert ds[0]["prompt"][0] == {"role": "system", "content": "You write Python."}
    assert ds[0]["prompt"][1]["role"] == "user" and ds[0]["test_list"][0] in ds[0]["prompt"][1]["content"]


def test_adapt_dataset_bad_row_names_index():
    from datasets import Dataset

    ds = Dataset.from_list([{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "oops"}])
    with pytest.raises(ValueError, match="row 1: column 'answer'"):
        adapt_dataset(ds)


def test_load_formatted_rejects_unknown_extension():
    with pytest.raises(ValueError, match="expected .jsonl, .json or .parquet"):
        load_formatted("data.csv")


# ----------------------------------------------------------------------------- dataset_format in the trainer


def test_resolve_format_from_columns_and_unknown_layout_is_one_line():
    from dash_fast.data.formats import resolve_format

    for name, fmt in (("gsm8k_sample.jsonl", "gsm8k"), ("math_sample.jsonl", "math"), ("mbpp_sample.jsonl", "mbpp")):
        assert resolve_format(read_jsonl(name)) == fmt
    assert resolve_format([{"prompt": "1+1=", "answer": "2"}]) == "prompt"
    assert resolve_format([{"question": "q", "answer": "#### 1"}], "prompt") == "prompt"  # named, not detected
    with pytest.raises(ValueError) as e:
        resolve_format([{"input": "x", "target": "y"}])
    msg = str(e.value)
    assert "\n" not in msg and "['input', 'target']" in msg
    for fmt in ("prompt", "gsm8k", "math", "mbpp"):
        assert fmt in msg
    with pytest.raises(ValueError, match="dataset_format='csv'"):
        resolve_format([{"prompt": "x"}], "csv")


def tiny_trainer(tmp_path, train, reward_funcs=None, trainer_cls=None, **overrides):
    from dash_fast import DashConfig, DashTrainer
    from dash_fast.embedded.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, TINY_MODEL)
    args = dict(output_dir=str(tmp_path), max_steps=1, prompts_per_step=2, group_size=2, max_completion_tokens=4,
                report_to=[], disable_tqdm=True, eval_examples=2)
    args.update(overrides)
    return (trainer_cls or DashTrainer)(model, reward_funcs, args=DashConfig(**args), train_dataset=train,
                                        eval_dataset=train, processing_class=tok)


@pytest.mark.parametrize("name, fmt, reward", [("gsm8k_sample.jsonl", "gsm8k", "math_reward"),
                                                ("math_sample.jsonl", "math", "math_reward"),
                                                ("mbpp_sample.jsonl", "mbpp", "code_reward"),
                                                ("gsm8k_sample.parquet", "gsm8k", "math_reward")])
def test_trainer_reads_datasets_by_format_with_the_matching_reward(tmp_path, name, fmt, reward):
    trainer = tiny_trainer(tmp_path, str(TEST_DATA / name))
    assert trainer.dataset_format == fmt and trainer.reward_names == [reward]
    adapted = adapt_rows(read_jsonl(name) if name.endswith(".jsonl") else read_jsonl("gsm8k_sample.jsonl"))
    assert [r["prompt"] for r in trainer.train_data.rows] == [r["prompt"] for r in adapted]
    assert [r["answer"] for r in trainer.eval_data.rows] == [r["answer"] for r in adapted]


def test_gsm8k_sample_trains_with_the_math_reward(tmp_path):
    trainer = tiny_trainer(tmp_path, str(TEST_DATA / "gsm8k_sample.jsonl"), max_prompt_tokens=1024)
    trainer.train()
    assert 0.0 <= trainer.state.log_history[0]["rewards/math_reward"] <= 1.0  # a number (nan fails)


def test_grpo_trainer_takes_dataset_format(tmp_path):
    from dash_fast import GRPOConfig, GRPOTrainer
    from dash_fast.embedded.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, TINY_MODEL)
    rows = read_jsonl("math_sample.jsonl")
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, max_prompt_length=1024, report_to="none")
    trainer = GRPOTrainer(model, "math", args=args, train_dataset=rows, processing_class=tok)
    assert trainer.dataset_format == "math" and trainer.train_data.rows[0]["answer"] == "\\frac{5}{6}"
    with pytest.raises(ValueError, match="row 0: missing column 'question'"):
        GRPOTrainer(model, "math", args=GRPOConfig(output_dir=str(tmp_path), max_steps=1, num_generations=2,
                                                   dataset_format="gsm8k", report_to="none"),
                    train_dataset=rows, processing_class=tok)


def test_unknown_layout_from_the_cli_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "odd.jsonl"
    data.write_text(json.dumps({"input": "2+2", "target": "4"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "dash_fast.cli", "train", "--model", "unused", "--dataset",
                           str(data), "--output-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and "['input', 'target']" in proc.stderr and "gsm8k" in proc.stderr
