"""When to stop: end-of-sequence ids, user stop token ids, stop words, the step budget."""

from collections.abc import Callable, Iterable


class StopCondition:
    """Checked after every new token, on everything generated so far (never just the latest chunk)."""

    def __init__(
        self,
        eos_token_ids: Iterable[int],
        stop_token_ids: Iterable[int] = (),
        stop_words: Iterable[str] = (),
        decode: Callable[[list[int]], str] | None = None,
    ):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop_words = tuple(w for w in stop_words if w)
        if self.stop_words and decode is None:
            raise ValueError("stop words need a decode function")
        self.decode = decode
        # A stop word of n characters ends within the last n tokens (a token decodes to at least one character,
        # give or take partial UTF-8 sequences, hence the margin).
        self.window = max((len(w) for w in self.stop_words), default=0) + 4

    @property
    def token_ids(self) -> frozenset[int]:
        """Tokens after which nothing more is generated; drafting stops at them too."""
        return self.eos_token_ids | self.stop_token_ids

    def reason(self, generated: list[int]) -> str | None:
        """Why generation must stop after the last token of `generated`, or None to go on."""
        last = generated[-1]
        if last in self.eos_token_ids:
            return "eos"
        if last in self.stop_token_ids:
            return "stop_token"
        if self.stop_words:
            tail = self.decode(generated[-self.window :])
            if any(word in tail for word in self.stop_words):
                return "stop_word"
        return None
