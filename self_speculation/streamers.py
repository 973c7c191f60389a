"""Streamers: the only code that writes generated text to the console."""

import os
import sys
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase, TextStreamer

try:
    from wcwidth import wcwidth
except ImportError:  # a minimal install (torch and transformers only): one column per printable character

    def wcwidth(char: str) -> int:
        return 1 if char.isprintable() else 0

DRAFT = "\033[2;33m"  # dim yellow: drafted, not yet verified
ACCEPTED = "\033[32m"  # green: verified text
RESET = "\033[0m"
CLEAR_TO_END = "\033[J"
TAB = 8


@dataclass
class Cursor:
    """The column where the next character lands, followed as a terminal moves it: a newline or carriage return
    goes to column 0, a tab to the next multiple of 8, a character as wide as it is shown; a row that is full
    wraps when the next character comes, so `col == width` means "at the end of a full row"."""

    col: int = 0

    def advance(self, text: str, width: int, max_rows: int | None = None) -> tuple[str, int]:
        """Move over `text`; returns the part of it written before `max_rows` row changes would be exceeded (all of
        it when None), and the number of rows the cursor moved down."""
        rows = 0
        for i, char in enumerate(text):
            if char in "\r\n":
                col, down = 0, char == "\n"
            elif char == "\t":
                col, down = min((self.col // TAB + 1) * TAB, width - 1), False
            else:
                w = max(wcwidth(char), 0)  # 0 for combining and control characters
                down = w > 0 and self.col + w > width
                col = (0 if down else self.col) + w
            if down and max_rows is not None and rows == max_rows:
                return text[:i], rows
            rows += down
            self.col = col
        return text, rows


class SpeculativeStreamer(TextStreamer):
    """Shows each drafted token as it is drafted; when the verifier answers, the drafts are erased and the verified
    text is written in their place.

    Erasing moves the cursor back by as many rows as the drafts took (counted with `Cursor`) and clears to the end
    of the screen. Movements relative to the cursor stay right when the drafts made the screen scroll, unlike a
    saved cursor position; drafts are cut to fit the screen's height. Where the stream is not a terminal (a file, a
    pipe), it writes the verified text alone, with no escape codes."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stream=None, size=None, **decode_kwargs):
        """`size` returns the terminal's (columns, lines); by default it is asked of the stream's terminal."""
        super().__init__(tokenizer, **decode_kwargs)
        self.stream = stream or sys.stdout
        if size is None and self.stream.isatty():
            size = lambda: tuple(os.get_terminal_size(self.stream.fileno()))  # noqa: E731 (asked each time: resizes)
        self.size = size  # None: not a terminal
        self.cursor = Cursor()  # after the text written for good
        self.drafts: list[int] = []
        self.drawn: tuple[int, int] | None = None  # (rows down, column) of where the shown drafts begin

    def put_draft(self, token: int) -> None:
        self.erase()
        self.drafts.append(token)
        if self.size is None:
            return
        width, height = self.size()
        if self.cursor.col >= width:
            return  # a full row: the next character wraps; drafts show again once verified text moves on
        verified = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        drafted = self.tokenizer.decode(self.token_cache + self.drafts, **self.decode_kwargs)
        pending, guess = verified[self.print_len :], drafted[len(verified) :]  # an unfinished word, then drafts
        cursor = Cursor(self.cursor.col)
        shown, rows = cursor.advance(pending + guess, width, max_rows=max(height - 2, 0))
        self.stream.write(ACCEPTED + shown[: len(pending)] + DRAFT + shown[len(pending) :] + RESET)
        self.stream.flush()
        self.drawn = (rows, self.cursor.col)

    def erase(self) -> None:
        """Remove the drafts shown: up to the row they began on, to their column, clear below."""
        if self.drawn is None:
            return
        rows, col = self.drawn
        self.stream.write((f"\033[{rows}A" if rows else "") + "\r" + (f"\033[{col}C" if col else "") + CLEAR_TO_END)
        self.drawn = None

    def put(self, value) -> None:
        self.erase()
        self.drafts = []
        super().put(value)

    def end(self) -> None:
        self.erase()
        self.drafts = []
        super().end()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        text += "\n" if stream_end else ""
        if self.size is None:
            self.stream.write(text)
        else:
            self.cursor.advance(text, self.size()[0])
            self.stream.write(ACCEPTED + text + RESET)
        self.stream.flush()


def _no_streamer(tokenizer, **decode_kwargs):
    return None


STREAMERS = {
    "none": _no_streamer,
    "standard": TextStreamer,
    "speculative": SpeculativeStreamer,
}
