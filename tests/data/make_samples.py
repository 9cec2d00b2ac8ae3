"""Write the small sample datasets used by tests/unit/test_formats.py (and by hand-run smoke tests).

Rows are written for dash-fast in the shape of the real datasets (same field names and answer
conventions: GSM8K's ``<<calc>>`` annotations and ``#### n``, MATH's ``\\boxed{}``, MBPP's asserts).
Run: python tests/data/make_samples.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

GSM8K = [
    (
        "A baker makes 24 muffins in the morning and 18 in the afternoon. He sells 30 of them. How many muffins are left?",
        "He makes 24 + 18 = <<24+18=42>>42 muffins.\nAfter selling, 42 - 30 = <<42-30=12>>12 muffins are left.\n#### 12",
    ),
    (
        "Maria reads 15 pages a day. How many pages does she read in 2 weeks?",
        "Two weeks have 2 * 7 = <<2*7=14>>14 days.\nShe reads 15 * 14 = <<15*14=210>>210 pages.\n#### 210",
    ),
    (
        "A bike costs $240. Tom has saved a quarter of the price. How much more money does he need?",
        "Tom saved 240 / 4 = <<240/4=60>>60 dollars.\nHe needs 240 - 60 = <<240-60=180>>180 more dollars.\n#### 180",
    ),
    (
        "There are 6 rows of chairs with 12 chairs in each row. 17 chairs are taken. How many chairs are free?",
        "There are 6 * 12 = <<6*12=72>>72 chairs.\n72 - 17 = <<72-17=55>>55 chairs are free.\n#### 55",
    ),
    (
        "Sam buys 3 notebooks at $4 each and a pen for $2. He pays with a $20 bill. How much change does he get?",
        "The notebooks cost 3 * 4 = <<3*4=12>>12 dollars.\nIn total he spends 12 + 2 = <<12+2=14>>14 dollars.\n"
        "His change is 20 - 14 = <<20-14=6>>6 dollars.\n#### 6",
    ),
    (
        "A tank holds 1,200 liters. It is filled at 40 liters per minute. How many minutes does it take to fill it?",
        "It takes 1200 / 40 = <<1200/40=30>>30 minutes.\n#### 30",
    ),
    (
        "Lena is 3 times as old as her brother, who is 7. How old will Lena be in 5 years?",
        "Lena is 3 * 7 = <<3*7=21>>21 years old.\nIn 5 years she will be 21 + 5 = <<21+5=26>>26.\n#### 26",
    ),
    (
        "A farm has 14 cows and twice as many sheep. Each animal eats 2 kg of hay a day. How much hay do they eat per day?",
        "There are 14 * 2 = <<14*2=28>>28 sheep.\nThere are 14 + 28 = <<14+28=42>>42 animals.\n"
        "They eat 42 * 2 = <<42*2=84>>84 kg of hay.\n#### 84",
    ),
    (
        "A school orders 45 boxes of pencils with 24 pencils each. How many pencils is that?",
        "45 * 24 = <<45*24=1080>>1080 pencils.\n#### 1,080",
    ),
    (
        "The temperature was 4 degrees in the morning and dropped by 9 degrees at night. What was the temperature at night?",
        "4 - 9 = <<4-9=-5>>-5 degrees.\n#### -5",
    ),
]

MATH = [
    (
        "What is the value of $\\frac{1}{2} + \\frac{1}{3}$?",
        "We have $\\frac{1}{2} + \\frac{1}{3} = \\frac{3}{6} + \\frac{2}{6} = \\boxed{\\frac{5}{6}}$.",
        "Prealgebra",
        "Level 1",
    ),
    ("Solve for $x$: $3x - 7 = 11$.", "Adding 7 gives $3x = 18$, so $x = \\boxed{6}$.", "Algebra", "Level 1"),
    (
        "Compute $\\sqrt{50}$ in simplest radical form.",
        "$\\sqrt{50} = \\sqrt{25 \\cdot 2} = \\boxed{5\\sqrt{2}}$.",
        "Prealgebra",
        "Level 2",
    ),
    (
        "What is the sum of the roots of $x^2 - 5x + 6 = 0$?",
        "By Vieta's formulas the sum of the roots is $\\boxed{5}$.",
        "Algebra",
        "Level 2",
    ),
    (
        "Find the distance between the points $(1, 2)$ and $(4, 6)$.",
        "The distance is $\\sqrt{(4-1)^2 + (6-2)^2} = \\sqrt{9 + 16} = \\boxed{5}$.",
        "Algebra",
        "Level 2",
    ),
    (
        "How many positive divisors does $36$ have?",
        "$36 = 2^2 \\cdot 3^2$, so it has $(2+1)(2+1) = \\boxed{9}$ divisors.",
        "Number Theory",
        "Level 2",
    ),
    (
        "Simplify $\\frac{x^2 - 1}{x - 1}$ for $x \\neq 1$.",
        "Factoring, $\\frac{(x-1)(x+1)}{x-1} = \\boxed{x+1}$.",
        "Algebra",
        "Level 1",
    ),
    (
        "What is $\\dbinom{6}{2}$?",
        "$\\dbinom{6}{2} = \\frac{6 \\cdot 5}{2} = \\boxed{15}$.",
        "Counting & Probability",
        "Level 1",
    ),
    (
        "Express $0.\\overline{3}$ as a common fraction.",
        "Let $x = 0.\\overline{3}$; then $10x - x = 3$, so $x = \\boxed{\\frac{1}{3}}$.",
        "Prealgebra",
        "Level 2",
    ),
    (
        "Find the ordered pair $(a, b)$ with $a + b = 7$ and $a - b = 1$.",
        "Adding the equations, $2a = 8$, so $a = 4$ and $b = 3$: $\\boxed{(4, 3)}$. Note $\\{a, b\\}$ is a set.",
        "Algebra",
        "Level 3",
    ),
]

MBPP = [
    (
        "Write a function to find the maximum of three numbers.",
        "def max_of_three(a, b, c):\n    return max(a, b, c)",
        [
            "assert max_of_three(1, 2, 3) == 3",
            "assert max_of_three(5, 2, 1) == 5",
            "assert max_of_three(-1, -7, -3) == -1",
        ],
    ),
    (
        "Write a python function to reverse a string.",
        "def reverse_string(s):\n    return s[::-1]",
        [
            "assert reverse_string('abc') == 'cba'",
            "assert reverse_string('') == ''",
            "assert reverse_string('ab') == 'ba'",
        ],
    ),
    (
        "Write a function to check whether a number is prime.",
        "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
        "        if n % i == 0:\n            return False\n        i += 1\n    return True",
        ["assert is_prime(2) == True", "assert is_prime(15) == False", "assert is_prime(29) == True"],
    ),
    (
        "Write a function to count the vowels in a string.",
        "def count_vowels(s):\n    return sum(ch in 'aeiouAEIOU' for ch in s)",
        [
            "assert count_vowels('hello') == 2",
            "assert count_vowels('sky') == 0",
            "assert count_vowels('AEIOU') == 5",
        ],
    ),
    (
        "Write a function to compute the n-th Fibonacci number.",
        "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
        ["assert fib(0) == 0", "assert fib(1) == 1", "assert fib(10) == 55"],
    ),
    (
        "Write a function to remove duplicates from a list while keeping the order.",
        "def dedup(xs):\n    seen = set()\n    return [x for x in xs if not (x in seen or seen.add(x))]",
        [
            "assert dedup([1, 2, 1, 3]) == [1, 2, 3]",
            "assert dedup([]) == []",
            "assert dedup([4, 4, 4]) == [4]",
        ],
    ),
    (
        "Write a function to find the k smallest elements of a list using a heap.",
        "import heapq\ndef k_smallest(xs, k):\n    return heapq.nsmallest(k, xs)",
        [
            "assert k_smallest([5, 1, 4, 2], 2) == [1, 2]",
            "assert k_smallest([3], 1) == [3]",
            "assert k_smallest([9, 8, 7], 3) == [7, 8, 9]",
        ],
    ),
    (
        "Write a function to check whether a string is a palindrome, ignoring case.",
        "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]",
        [
            "assert is_palindrome('Level') == True",
            "assert is_palindrome('abc') == False",
            "assert is_palindrome('') == True",
        ],
    ),
    (
        "Write a function to find the greatest common divisor of two integers.",
        "import math\ndef gcd(a, b):\n    return math.gcd(a, b)",
        ["assert gcd(12, 18) == 6", "assert gcd(7, 13) == 1", "assert gcd(0, 5) == 5"],
    ),
    (
        "Write a function to count the words of each length in a sentence.",
        "from collections import Counter\ndef word_lengths(s):\n    return dict(Counter(len(w) for w in s.split()))",
        [
            "assert word_lengths('a bb cc') == {1: 1, 2: 2}",
            "assert word_lengths('') == {}",
            "assert word_lengths('abc') == {3: 1}",
        ],
    ),
]


def main() -> None:
    import pandas as pd

    gsm8k = [{"question": q, "answer": a} for q, a in GSM8K]
    math_rows = [{"problem": p, "solution": s, "type": t, "level": lv} for p, s, t, lv in MATH]
    mbpp = [
        {
            "task_id": 601 + i,
            "text": text,
            "code": code,
            "test_list": tests,
            "test_setup_code": "",
            "challenge_test_list": [],
        }
        for i, (text, code, tests) in enumerate(MBPP)
    ]
    for name, rows in (("gsm8k_sample", gsm8k), ("math_sample", math_rows), ("mbpp_sample", mbpp)):
        with open(HERE / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    pd.DataFrame(gsm8k).to_parquet(HERE / "gsm8k_sample.parquet", index=False)


if __name__ == "__main__":
    main()
