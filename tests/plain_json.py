"""Step records as users read them: metrics.jsonl must hold plain JSON numbers, never tensors."""

import json
import math


def assert_plain_numbers(record: dict) -> None:
    """Every value is a Python int / float / bool (a 0-d tensor or numpy scalar is not), and the record
    round-trips through json."""
    bad = {k: type(v).__name__ for k, v in record.items() if type(v) not in (int, float, bool)}
    assert not bad, f"non-plain values in a step record: {bad}"
    back = json.loads(json.dumps(record))
    assert back.keys() == record.keys()
    for k, v in record.items():
        assert back[k] == v or (isinstance(v, float) and math.isnan(v) and math.isnan(back[k])), k


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
