from __future__ import annotations

import threading

import pytest
import torch

from dash_fast.rewards import (
    REWARD_FUNCS,
    RewardError,
    code_reward,
    exact_answer_reward,
    format_reward,
    get_reward_func,
    make_code_reward,
    make_format_reward,
    math_reward,
)
from dash_fast.rewards import answers as R
from dash_fast.rewards.answers import extract_boxed, extract_final_answer
from dash_fast.rewards.calling import call_reward_func
from dash_fast.rewards.code import extract_code


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3+4=7\n7*2=14<eos>", "14"),
        ("3+4=7 7*2=14\n14<eos>", "14"),
        ("so x = 12", "12"),
        ("Answer: 5</s>", "5"),
        ("the ANSWER: -3 ", "-3"),
        ("work\n#### 72\n<|im_end|>", "72"),
        ("14", "14"),
        ("a = 1\nb=2=3\n\n", "3"),
        ("", ""),
        ("<eos>", ""),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_exact_answer_reward():
    out = exact_answer_reward(
        ["p"] * 4, ["1+1=2\n2<eos>", "1+1=3", "x = 5 ", "whatever"], answer=["2", "2", " 5", None]
    )
    assert out == [1.0, 0.0, 1.0, None]
    with pytest.raises(ValueError, match="'answer' column"):
        exact_answer_reward(["p"], ["1"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{\\frac{5}{6}}.", "\\frac{5}{6}"),
        ("\\boxed{1} then \\boxed{{a}_{b}}", "{a}_{b}"),
        ("\\fbox{7}", "7"),
        ("answer $\\boxed 5$", "5"),
        ("\\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_math_reward_gsm8k_and_math_golds():
    completions = [
        "She sells 48 + 24 = 72 clips.\n#### 72",
        "The answer is \\boxed{72}.",
        "#### 73",
        "So the result is $\\boxed{0.5}$",
        "$\\boxed{\\dfrac{1}{2}}$",
        "\\boxed{x(x+2)}",
        "I don't know \\boxed{",
        "",
    ]
    answer = ["Natalia sold 48/2 = 24.\n#### 72", "72", "72", None, None, None, None, "5"]
    solution = [
        None,
        None,
        None,
        "\\boxed{\\frac{1}{2}}",
        "so $\\boxed{\\frac12}$",
        "$\\boxed{x^2+2x}$",
        "\\boxed{3}",
        None,
    ]
    out = math_reward(["p"] * len(completions), completions, answer=answer, solution=solution)
    assert out == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_math_reward_not_applicable_and_missing_columns():
    assert math_reward(["p"], ["\\boxed{1}"], answer=[None]) == [None]
    with pytest.raises(ValueError, match="'answer' or a 'solution'"):
        math_reward(["p"], ["\\boxed{1}"])


def test_math_reward_garbage_never_raises(monkeypatch):
    monkeypatch.setattr(R, "MATH_TIMEOUT_S", 1)
    junk = [
        "\\boxed{\\frac{}{}}",
        "\\boxed{}}}{{",
        "$$$$",
        "\\boxed{2^{2^{2^{2^{100}}}}}",
        "\\begin{pmatrix",
        "x" * 5000,
    ]
    out = math_reward(["p"] * len(junk), junk, answer=["1"] * len(junk))
    assert out == [0.0] * len(junk)


def test_math_reward_off_main_thread_uses_worker():
    result = {}
    t = threading.Thread(
        target=lambda: result.update(
            out=math_reward(["p"] * 2, ["\\boxed{\\frac{1}{2}}", "#### 3"], answer=["0.5", "4"])
        )
    )
    t.start()
    t.join(timeout=60)
    assert result["out"] == [1.0, 0.0]


def test_format_reward_default_and_custom():
    completions = ["work \\boxed{3}", "x\n#### 3", "1+2=3\n3<eos>", "I am not sure", "", "7*2=14"]
    assert format_reward(["p"] * 6, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    custom = make_format_reward(r"^<think>.*</think>")
    assert custom(["p"] * 2, ["<think>hm</think> 3", "3"]) == [1.0, 0.0]
    assert custom.__name__ == "format_reward"


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    two = "```python\na = 1\n```\ntext\n```py\nb = 2\n```"
    assert extract_code(two) == "b = 2\n"
    assert extract_code("```\nc = 3\n```") == "c = 3\n"
    assert extract_code("```python\ndef g(): pass") == "def g(): pass"  # truncated completion
    assert extract_code("def h(): pass") == "def h(): pass"


def test_code_reward_all_pass():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    half = "```python\ndef add(a, b):\n    return 3\n```"
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
    out = make_code_reward(timeout_s=1.0)(
        ["p"] * 4,
        [good, half, "while True: pass", good],
        test_list=[tests, tests, tests, []],
    )
    assert out == [1.0, 0.0, 0.0, None]


def test_code_reward_mbpp_setup_columns():
    code = "def area(r):\n    return PI * r * r\n"
    out = code_reward(
        ["p"],
        [code],
        test_list=[["assert area(1) == PI"]],
        test_setup_code=["PI = 3"],
        test_imports=[["import math"]],
    )
    assert out == [1.0]


def test_code_reward_scores_a_forged_verdict_zero():
    # The exploit of issue 17: the old harness's reporter, found by a frame walk; and a well-formed
    # forged result stream on the result fd. Both score 0; the honest program still scores 1.
    wrong = "def add(a, b):\n    return a - b\n"
    frame_walk = wrong + "import sys\nf = sys._getframe(1).f_locals\nf.get('report', print)('ok', 2)\n"
    forged = wrong + "import os\nos.write(4, b'{\"code\": \"ok\"}\\n{\"t\": 0, \"r\": [[\"ok\", [\"b\", true]]]}\\n')\n"
    forged += "os.write(4, b'{\"t\": 1, \"r\": [[\"ok\", [\"b\", true]]]}\\n{\"done\": true}\\n')\nos._exit(0)\n"
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
    out = code_reward(["p"] * 3, [frame_walk, forged, wrong.replace("a - b", "a + b")], test_list=[tests] * 3)
    assert out == [0.0, 0.0, 1.0]


def test_registry_and_unknown_name():
    assert get_reward_func("math") is math_reward
    assert get_reward_func("math_reward") is math_reward
    assert get_reward_func(len) is len
    assert get_reward_func("dash_fast.rewards:format_reward") is format_reward
    assert get_reward_func("dash_fast.rewards.answers:format_reward") is format_reward
    assert set(REWARD_FUNCS) == {"exact_answer", "math", "format", "code"}
    with pytest.raises(
        ValueError, match=r"unknown reward function 'mtah'; did you mean 'math'\?.*code, exact_answer"
    ):
        get_reward_func("mtah")
    with pytest.raises(ValueError, match="cannot load"):
        get_reward_func("no_such_module_xyz:f")


def _call(func, n=2):
    return call_reward_func(func, ["p"] * n, ["c"] * n, None, {"answer": ["1"] * n})


def test_call_reward_func_validates():
    def ok(prompts, completions, completion_ids=None, **kw):
        return [1, None]

    assert _call(ok) == [1.0, None]

    def boom(prompts, completions, **kw):
        raise ValueError("missing\nthing")

    def short(prompts, completions, **kw):
        return [1.0]

    def text(prompts, completions, **kw):
        return [1.0, "yes"]

    def nan(prompts, completions, **kw):
        return [1.0, float("nan")]

    def inf(prompts, completions, **kw):
        return torch.tensor([float("inf"), 0.0])

    def scalar(prompts, completions, **kw):
        return 1.0

    cases = {
        boom: r"'boom' raised ValueError: missing thing",
        short: r"'short' returned 1 values for 2 completions",
        text: r"'text' returned a non-numeric value at row 1",
        nan: r"'nan' returned a non-finite value at row 1",
        inf: r"'inf' returned a non-finite value at row 0",
        scalar: r"'scalar' returned float",
    }
    for func, pattern in cases.items():
        with pytest.raises(RewardError, match=pattern) as info:
            _call(func)
        assert "\n" not in str(info.value)


def test_builtin_rewards_pass_validation():
    out = call_reward_func(R.exact_answer_reward, ["p"], ["=3"], [[1, 2]], {"answer": ["3"]})
    assert out == [1.0]
