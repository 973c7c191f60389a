"""Every numeric flag of every script, against the values that broke them (nan, inf, negatives, zero, huge): a
value is either accepted by the script's argument checks or refused there with one line naming the flag, never
an exception of another kind, and a float flag never accepts nan or an infinity. This runs the argument checks only (`arguments.parse` on each script's ARGUMENTS),
so it stays fast; the bad-input tables run whole scripts."""

import math
import typing
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arguments import parse
from bad_input import SCRIPTS
from self_speculation.errors import UsageError

REQUIRED = {"train": ["--output_dir", "unused"]}  # parsing writes nothing; train.py has no default directory
NUMBERS = (int, float)


def numeric_flags():
    """(script, flag, type) for every int or float field (optional or a list of them) of every script."""
    found = []
    for script, module in SCRIPTS.items():
        for dataclass_type in getattr(module, "ARGUMENTS", ()):
            hints = typing.get_type_hints(dataclass_type)
            for f in fields(dataclass_type):
                kinds = [k for k in typing.get_args(hints[f.name]) or (hints[f.name],) if k is not type(None)]
                kinds = [typing.get_args(k)[0] if typing.get_origin(k) is list else k for k in kinds]
                if kinds and kinds[0] in NUMBERS:
                    found.append((script, f"--{f.name}", kinds[0]))
    return found


FLAGS = numeric_flags()
EDGES = [math.nan, math.inf, -math.inf, 0, 0.0, -1, -0.5, 1e-300, 1e300, 2**63, 10**30, 10**400, -(10**30)]
VALUES = st.one_of(st.sampled_from(EDGES), st.integers(), st.floats(allow_nan=True, allow_infinity=True))


def test_every_script_has_numeric_flags_to_check():
    scripts = {script for script, _, _ in FLAGS}
    assert scripts == set(SCRIPTS), f"no numeric flag found for {set(SCRIPTS) - scripts}"
    assert len(FLAGS) > 60


@pytest.mark.parametrize("script, flag, kind", FLAGS, ids=[f"{s} {f}" for s, f, _ in FLAGS])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES)
def test_a_numeric_flag_is_accepted_or_refused_by_name(script, flag, kind, value):
    text = str(int(value)) if kind is int and isinstance(value, float) and math.isfinite(value) else str(value)
    argv = REQUIRED.get(script, []) + [flag, text]
    try:
        parse(SCRIPTS[script].ARGUMENTS, argv)
    except UsageError as error:
        message = str(error)
        assert flag in message and "\n" not in message, message
    else:  # no number of any flag means something when it is not finite (nan compares false with every bound)
        assert kind is int or math.isfinite(float(value)), f"{script} {flag} {value} was accepted"
