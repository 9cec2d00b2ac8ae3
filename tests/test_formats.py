from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dash_fast.formats import (
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

DATA = Path(__file__).parent / "data"


def read_jsonl(name: str) -> list[dict]:
    with open(DATA / name) as f:
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
    ds = load_formatted(str(DATA / name), cache_dir=str(tmp_path))
    assert (
        len(ds) == 10
        and ds[0]["answer"] == "12"
        and {"prompt", "answer", "solution", "question"} <= set(ds.column_names)
    )


def test_load_formatted_mbpp_chat(tmp_path):
    ds = load_formatted(
        str(DATA / "mbpp_sample.jsonl"), chat=True, system_prompt="You write Python.", cache_dir=str(tmp_path)
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
