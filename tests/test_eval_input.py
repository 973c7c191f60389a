"""eval.py's bad input, as a table in the form of test_bad_input.py's: the script, its flags, the words its one-line
error must hold (checked by bad_input.assert_refused: exit status 2, no traceback, nothing written)."""

import math
from dataclasses import fields

import pytest

from arguments import parse
from bad_input import assert_refused, case_id
from eval import EvalArguments
from self_speculation import UsageError

LINE = ["--model", "{model}", "--tasks", "layerskip_stdlib_line", "--limit", "1"]

CASES = [
    # sizes that are not numbers of examples
    ("eval", LINE[:4] + ["--limit", "nan"], ["--limit", "finite"]),
    ("eval", LINE[:4] + ["--limit", "inf"], ["--limit", "finite"]),
    ("eval", LINE[:4] + ["--limit", "1e400"], ["--limit", "finite"]),
    ("eval", LINE[:4] + ["--limit", "-1"], ["--limit", "> 0"]),
    ("eval", LINE[:4] + ["--limit", "0"], ["--limit", "> 0"]),
    ("eval", LINE[:4] + ["--limit", "2.5"], ["--limit", "whole number"]),
    ("eval", LINE + ["--num_fewshot", "-1"], ["--num_fewshot", ">= 0"]),
    # more few-shot examples than a task holds (lm-eval: random.sample's traceback); never the document itself
    ("eval", LINE + ["--num_fewshot", "48"], ["--num_fewshot 48", "layerskip_stdlib_line has 48 few-shot examples",
                                             "47 besides"]),
    ("eval", ["--model", "{model}", "--tasks", "layerskip_stdlib", "--limit", "1", "--num_fewshot",
              "1000000000000000000000"], ["--num_fewshot 1000000000000000000000", "few-shot examples"]),
    # a generation budget that leaves no room for the prompt in the tiny model's context of 256
    ("eval", LINE + ["--max_steps", "300"], ["--max_steps 300", "context of 256"]),
]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_bad_eval_input_gets_one_line(case, files, capsys, monkeypatch):
    assert_refused(*case, files, capsys, monkeypatch)


NUMERIC = [f.name for f in fields(EvalArguments) if f.type in (int, float, int | None, float | None)]
VALUES = ["nan", "inf", "-inf", "-1", "0", "0.5", "1", "1e300", "1" + "0" * 400]


def test_eval_has_the_numeric_flags_it_is_known_to_have():
    assert NUMERIC == ["limit", "num_fewshot"]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: v if len(v) < 8 else f"1e{len(v) - 1}-as-digits")
@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_flag_is_checked(name, value):
    """Each value is either refused in a line naming the flag, or accepted as a finite number in range."""
    try:
        [args] = parse((EvalArguments,), [f"--{name}", value])
    except UsageError as error:
        assert f"--{name}" in str(error)
        return
    number = getattr(args, name)
    assert isinstance(number, int) or math.isfinite(number), number  # a huge int is fine: it never becomes a float
    assert number > 0 if name == "limit" else number >= 0
