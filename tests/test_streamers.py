"""The speculative streamer, rendered by a terminal emulator: whatever the drafts did, a screen that scrolled shows
exactly the verified text; and a stream that is not a terminal gets that text with no escape codes."""

import io
import random

import pyte
import pytest
import torch

from models import byte_tokenizer
from self_speculation.streamers import Cursor, SpeculativeStreamer

CODE = "\n".join(
    [
        "def fibonacci(n):",
        '    """Return the n-th Fibonacci number, computed iteratively so that large n do not exhaust the stack."""',
        "    a, b = 0, 1",
        "\tfor _ in range(n):  # a tab, then a loop",
    ]
    + [f"        a, b = b, a + b  # step {i} {'of the loop, with a comment long enough to wrap ' * (i % 3)}" for i in range(26)]
    + ["    return a"]
)
WRONG = list("x(\n ):\t=") + ["\n\n"]


def render(output: str, columns: int, lines: int) -> list[str]:
    """Every row the terminal showed, those scrolled off the top first, without trailing blanks."""
    screen = pyte.HistoryScreen(columns, lines, history=100_000)
    pyte.Stream(screen).feed(output.replace("\n", "\r\n"))  # the terminal driver turns \n into \r\n (onlcr)
    rows = ["".join(row[x].data for x in range(columns)) for row in screen.history.top] + screen.display
    rows = [row.rstrip() for row in rows]
    while rows and not rows[-1]:
        rows.pop()
    return rows


def stream_with_drafts(streamer, ids: list[int], tokenizer, seed: int) -> None:
    """Decoding as self-speculation shows it: each step drafts up to 6 tokens, of which a random number are right;
    the verified tokens then come in one `put`."""
    rng = random.Random(seed)
    i = 0
    while i < len(ids):
        drafted = rng.randint(0, 6)
        right = min(rng.randint(0, drafted), len(ids) - i - 1)
        wrong = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(rng.choice(WRONG)))[0] for _ in range(drafted - right)]
        for token in ids[i : i + right] + wrong:
            streamer.put_draft(token)
        streamer.put(torch.tensor(ids[i : i + right + 1]))
        i += right + 1
    streamer.end()


@pytest.mark.parametrize("columns, lines", [(100, 12), (40, 8), (23, 3), (17, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_scrolling_terminal_shows_exactly_the_verified_text(columns, lines, seed):
    tokenizer = byte_tokenizer()
    ids = tokenizer(CODE, add_special_tokens=False).input_ids
    output = io.StringIO()
    streamer = SpeculativeStreamer(tokenizer, stream=output, size=lambda: (columns, lines))
    stream_with_drafts(streamer, ids, tokenizer, seed)
    assert "\033[2;33m" in output.getvalue()  # drafts were shown
    assert render(output.getvalue(), columns, lines) == render(CODE + "\n", columns, lines)


def test_not_a_terminal_gets_plain_text():
    tokenizer = byte_tokenizer()
    output = io.StringIO()
    stream_with_drafts(SpeculativeStreamer(tokenizer, stream=output), tokenizer(CODE, add_special_tokens=False).input_ids,
                       tokenizer, seed=0)
    assert output.getvalue() == CODE + "\n"


@pytest.mark.parametrize(
    "start, text, width, expected",
    [
        (0, "abc", 10, (3, 0)),
        (8, "ab", 10, (10, 0)),  # fills the row: stays on it until the next character
        (8, "abc", 10, (1, 1)),
        (10, "\n", 10, (0, 1)),  # a newline at the end of a full row moves down once
        (3, "\t", 10, (8, 0)),
        (9, "\t", 10, (9, 0)),  # no tab stop left: the last column
        (0, "界a", 10, (3, 0)),  # a wide character takes two columns
        (9, "界", 10, (2, 1)),  # and does not fit in the last one
    ],
)
def test_cursor_moves_as_a_terminal_does(start, text, width, expected):
    cursor = Cursor(start)
    _, rows = cursor.advance(text, width)
    assert (cursor.col, rows) == expected


def test_cursor_cuts_text_at_the_row_limit():
    shown, rows = Cursor(0).advance("ab\ncd\nef", 10, max_rows=1)
    assert (shown, rows) == ("ab\ncd", 1)
