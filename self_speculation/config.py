"""The generation configuration: plain data, one object, also parsed from the command line by arguments.py. Its
values are checked here one by one; what they mean for a strategy and a model is the strategy's to check
(`strategies.configured`)."""

from dataclasses import dataclass, field

from .errors import UsageError, check_range, check_text


DRAFT_POLICIES = ("static", "adaptive")  # drafting.POLICIES


@dataclass
class GenerationConfig:
    generation_strategy: str = field(
        default="autoregressive",
        metadata={
            "help": "autoregressive (the full model; with --exit_layer, early exit), early_exit (the first "
            "--exit_layer layers only) or self_speculative (draft with the first --exit_layer layers, verify with "
            "the rest)",
        },
    )
    max_steps: int = field(default=512, metadata={"help": "maximum number of new tokens (>= 1)"})
    exit_layer: int = field(
        default=-1,
        metadata={"help": "number of layers of the early exit / draft model (>= 1); -1: the full model for "
                          "autoregressive, the model's recommended exit layer for self_speculative"},
    )
    num_speculations: int = field(
        default=-1,
        metadata={"help": "tokens drafted per step (>= 1) by self_speculative: at every step with --draft_policy "
                          "static, at the first with adaptive; -1: the model's recommendation"},
    )
    batch_drafts: bool = field(
        default=True,
        metadata={"help": "self_speculative at batch sizes above 1 drafts as many tokens per step (0 to "
                          "--num_speculations; 0 is autoregressive decoding) as this machine's pass costs at that "
                          "batch size and the acceptance seen so far make fastest; False: always --num_speculations"},
    )
    draft_policy: str = field(
        default="adaptive",
        metadata={"choices": DRAFT_POLICIES,
                  "help": "how many tokens each self_speculative step drafts: adaptive (one prompt: from its recent "
                          "acceptance, starting at --num_speculations, up to 12, none while drafting does not pay; "
                          "a batch: as static) or static (--num_speculations; in batches see --batch_drafts)"},
    )
    compile: bool = field(
        default=False,
        metadata={"help": "run the decoding passes through torch.compile: faster per token, after about half a "
                          "minute of compilation per pass on first use (two passes for self_speculative)"},
    )
    sample: bool = field(default=True, metadata={"help": "sample (True) or greedy decoding (False)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (> 0)"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens when sampling (0: all)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass, in (0, 1]"})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "forbid repeating n-grams of this size (0: off)"})
    stop_words: list[str] = field(default_factory=list, metadata={"help": "stop after any of these strings"})
    stop_token_ids: list[int] = field(default_factory=list, metadata={"help": "stop after any of these token ids"})

    def __post_init__(self):
        check_range("--max_steps", self.max_steps, 1)
        if self.draft_policy not in DRAFT_POLICIES:
            raise UsageError(f"--draft_policy must be one of {', '.join(DRAFT_POLICIES)} (got {self.draft_policy!r})")
        if self.exit_layer != -1:
            check_range("--exit_layer", self.exit_layer, 1)
        if self.num_speculations != -1:
            check_range("--num_speculations", self.num_speculations, 1)
        # checked with --sample False too: a value refused when sampling is a mistake either way (0 is greedy)
        check_range("--temperature", self.temperature, 0, low_open=self.sample)  # inf would sample uniform noise
        check_range("--top_p", self.top_p, 0, 1, low_open=True)
        check_range("--top_k", self.top_k, 0)
        check_range("--no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if any(not word for word in self.stop_words):
            raise UsageError("--stop_words: an empty stop word would stop at once; give non-empty strings")
        for word in self.stop_words:
            check_text(word, "--stop_words")
        for token in self.stop_token_ids:
            check_range("--stop_token_ids", token, 0)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Stop tokens the model can produce: an id outside its vocabulary would never stop anything."""
        outside = [t for t in self.stop_token_ids if t >= vocab_size]
        if outside:
            raise UsageError(f"--stop_token_ids {', '.join(map(str, outside))}: outside the model's vocabulary of "
                             f"{vocab_size} tokens")
