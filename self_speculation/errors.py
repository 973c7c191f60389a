"""The one exception type that means "the user asked for something we cannot do", and the checks several scripts
share."""

import math


class UsageError(ValueError):
    """Bad input from the user. Scripts print its message on one line and exit with status 2."""


MAX_SEED = 2**32 - 1  # numpy's limit; lm-eval and the training data order seed numpy and torch with it


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be in [0, {MAX_SEED}] (got {seed})")


def check_range(flag: str, value: float, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Refuse a number that is not finite or lies outside [low, high] (an open end with low_open / high_open),
    naming the flag: `value < 0` is False for nan, so every bound is checked through here."""
    inside = (isinstance(value, int) or math.isfinite(value)) and (low is None or (value > low if low_open else value >= low)) and (
        high is None or (value < high if high_open else value <= high))
    if inside:
        return
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {low}"
    elif high is not None:
        bounds = f"{'<' if high_open else '<='} {high}"
    else:
        bounds = "finite"
    kind = "an integer" if isinstance(value, int) else "a finite number"
    raise UsageError(f"{flag} must be {kind} {bounds} (got {value})" if bounds != "finite"
                     else f"{flag} must be a finite number (got {value})")


def check_text(text: str, where: str) -> str:
    """Refuse text that is not valid Unicode, which every tokenizer rejects with a TypeError: lone surrogates, as
    a JSON escape such as "\\ud800" makes them, or as Python decodes bytes that are not UTF-8 on the command line
    and on a terminal (surrogate escapes U+DC80..U+DCFF, one per undecodable byte)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        char = ord(text[error.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"a lone surrogate U+{char:04X}"
        raise UsageError(f"{where}: not valid UTF-8 text ({what} at character {error.start + 1})") from None
    return text
