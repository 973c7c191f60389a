"""Streamers: the only code that writes generated text to the console."""

import sys

from transformers import PreTrainedTokenizerBase, TextStreamer

DRAFT = "\033[2;33m"  # dim yellow: drafted, not yet verified
ACCEPTED = "\033[32m"  # green: verified text
RESET = "\033[0m"
SAVE_CURSOR, RESTORE_CURSOR, CLEAR_TO_END = "\0337", "\0338", "\033[J"


class SpeculativeStreamer(TextStreamer):
    """Shows each drafted token as it is drafted; when the verifier answers, the drafts are erased and the
    verified text is written in their place."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stream=None, **decode_kwargs):
        super().__init__(tokenizer, **decode_kwargs)
        self.stream = stream or sys.stdout
        self.drafts: list[int] = []

    def put_draft(self, token: int) -> None:
        self.stream.write(RESTORE_CURSOR + CLEAR_TO_END if self.drafts else SAVE_CURSOR)
        self.drafts.append(token)
        verified = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        drafted = self.tokenizer.decode(self.token_cache + self.drafts, **self.decode_kwargs)
        # Verified text not yet printed (an unfinished word) in its colour, then the drafts.
        self.stream.write(ACCEPTED + verified[self.print_len :] + DRAFT + drafted[len(verified) :] + RESET)
        self.stream.flush()

    def put(self, value) -> None:
        if self.drafts:
            self.stream.write(RESTORE_CURSOR + CLEAR_TO_END)
            self.drafts = []
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(ACCEPTED + text + RESET + ("\n" if stream_end else ""))
        self.stream.flush()


def _no_streamer(tokenizer, **decode_kwargs):
    return None


STREAMERS = {
    "none": _no_streamer,
    "standard": TextStreamer,
    "speculative": SpeculativeStreamer,
}
