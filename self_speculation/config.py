"""The generation configuration: one object, also parsed from the command line by arguments.py."""

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import UsageError
from .strategies import STRATEGIES

STRATEGY_NAMES = tuple(STRATEGIES)


@dataclass
class GenerationConfig:
    generation_strategy: str = field(
        default="autoregressive",
        metadata={
            "help": "autoregressive (the full model, or plain early exit when --exit_layer is set) or "
            "self_speculative (draft with the first --exit_layer layers, verify with the rest)",
            "choices": STRATEGY_NAMES,
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
        if self.generation_strategy not in STRATEGY_NAMES:
            raise UsageError(
                f"--generation_strategy must be one of {', '.join(STRATEGY_NAMES)} (got {self.generation_strategy!r})"
            )
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

    @property
    def speculative(self) -> bool:
        return self.generation_strategy == "self_speculative"

    def for_model(self, model_config) -> "GenerationConfig":
        """This configuration completed and checked for a model: self_speculative takes the exit layer and draft
        length the checkpoint recommends (`layerskip` in its config) where the flags were not given, and the exit
        layer must leave layers to verify with."""
        num_layers = model_config.num_hidden_layers
        config = self
        if self.speculative:
            recommended = getattr(model_config, "layerskip", None) or {}
            config = dataclasses.replace(
                self,
                exit_layer=self.exit_layer if self.exit_layer != -1 else recommended.get("exit_layer", -1),
                num_speculations=self.num_speculations if self.num_speculations != -1
                else recommended.get("num_speculations", -1),
            )
            if config.exit_layer < 1:
                raise UsageError("--exit_layer must be >= 1 for self_speculative; this model recommends none")
            if config.num_speculations < 1:
                raise UsageError("--num_speculations must be >= 1 for self_speculative; this model recommends none")
            if config.exit_layer >= num_layers:
                raise UsageError(
                    f"--exit_layer must be in [1, {num_layers - 1}] for self_speculative with this "
                    f"{num_layers}-layer model (got {config.exit_layer})"
                )
        if config.exit_layer > num_layers:
            raise UsageError(
                f"--exit_layer must be in [1, {num_layers}] for this {num_layers}-layer model (got {config.exit_layer})"
            )
        return config
