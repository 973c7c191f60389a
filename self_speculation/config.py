"""The generation configuration: plain data, one object, also parsed from the command line by arguments.py. Its
values are checked here one by one; what they mean for a strategy and a model is the strategy's to check
(`strategies.configured`)."""

import math
from dataclasses import dataclass, field

from .errors import UsageError


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
        metadata={"help": "tokens drafted per verification (>= 1) for self_speculative; -1: the model's recommendation"},
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
        if self.max_steps < 1:
            raise UsageError(f"--max_steps must be >= 1 (got {self.max_steps})")
        if self.exit_layer != -1 and self.exit_layer < 1:
            raise UsageError(f"--exit_layer must be >= 1, or -1 for the full model (got {self.exit_layer})")
        if self.num_speculations != -1 and self.num_speculations < 1:
            raise UsageError(f"--num_speculations must be >= 1 (got {self.num_speculations})")
        if self.sample:
            if not 0 < self.temperature < math.inf:  # inf samples uniform noise; nan compares false
                raise UsageError(f"--temperature must be a finite number > 0 when sampling (got {self.temperature})")
            if not 0 < self.top_p <= 1:
                raise UsageError(f"--top_p must be in (0, 1] when sampling (got {self.top_p})")
            if self.top_k < 0:
                raise UsageError(f"--top_k must be >= 0 (got {self.top_k})")
        if self.no_repeat_ngram_size < 0:
            raise UsageError(f"--no_repeat_ngram_size must be >= 0 (got {self.no_repeat_ngram_size})")
