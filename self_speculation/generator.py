"""The generator: prompt in, tokens, text and speed figures out."""

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import layers
from .config import GenerationConfig
from .errors import UsageError
from .sampling import processors
from .stopping import StopCondition
from .strategies import Decoding, configured


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int]
    text: str
    stop_reason: str  # eos, stop_token, stop_word, max_steps or context_length
    drafted: int  # tokens drafted by the early exit (self_speculative only)
    accepted: int  # drafted tokens the full model agreed with
    steps: int  # strategy steps after the prompt: full-model passes for self_speculative
    total_time: float  # seconds, prompt included
    time_to_first_token: float
    cache_bytes: int = 0  # what the KV cache held at the end

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def time_per_token(self) -> float:
        return self.total_time / max(self.num_tokens, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.total_time if self.total_time > 0 else 0.0

    def report(self) -> str:
        """One line of speed figures for the terminal."""
        line = (
            f"time {self.total_time:.2f} s | {self.num_tokens} tokens | {1000 * self.time_per_token:.2f} ms/token | "
            f"{self.tokens_per_second:.1f} tokens/s | first token {1000 * self.time_to_first_token:.1f} ms"
        )
        if self.drafted:
            line += f" | acceptance {100 * self.acceptance_rate:.1f}% ({self.accepted}/{self.drafted} drafts)"
        return line


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def context_length(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _too_long(length: int, context: int | None) -> str | None:
    """Why a prompt of `length` tokens cannot be continued, or None: it must leave room for one new token."""
    if context is not None and length >= context:
        return f"the prompt is {length} tokens long; the model's context is {context} tokens"
    return None


def check_prompt_lengths(model: PreTrainedModel, prompts: list[list[int]]) -> None:
    """Before the first generation of a dataset: every prompt fits the model's context, or the first that does not
    is named by its 1-based position among the examples."""
    for number, prompt in enumerate(prompts, start=1):
        if (reason := _too_long(len(prompt), context_length(model))) is not None:
            raise UsageError(f"example {number} of {len(prompts)}: {reason}")


def _token_ids(value) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


class Generator:
    """Runs one strategy on one model. Validates the configuration against the model once, and holds what is
    derived from both: the strategy and, with --compile, its compiled passes."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        config: GenerationConfig,
        seed: int = 42,
    ):
        layers.check_layout(model)
        self.strategy, config = configured(config, model.config)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        passes = self.strategy.passes(config, layers.num_layers(model)) if config.compile else ()
        self.compiled = layers.CompiledPasses(model, passes) if passes else None
        self.device = model.lm_head.weight.device
        self.random = torch.Generator(device=self.device).manual_seed(seed)
        self.context_length = context_length(model)
        eos = _token_ids(model.generation_config.eos_token_id if model.generation_config else None)
        if tokenizer is not None:
            eos |= _token_ids(tokenizer.eos_token_id)
        self.stop = StopCondition(
            eos,
            config.stop_token_ids,
            config.stop_words,
            decode=tokenizer.decode if tokenizer is not None else None,
        )

    def generate(self, prompt: str, streamer=None) -> GenerationResult:
        if not prompt.strip():
            raise UsageError("the prompt is empty")
        prompt_ids = self.tokenizer(prompt).input_ids
        result = self.generate_ids(prompt_ids, streamer)
        result.text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
        return result

    def generate_ids(self, prompt_ids: list[int], streamer=None) -> GenerationResult:
        """Generate from token ids; `result.text` stays empty (no tokenizer involved)."""
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        budget = self.config.max_steps
        if (reason := _too_long(len(prompt_ids), self.context_length)) is not None:
            raise UsageError(reason)
        if self.context_length is not None:
            budget = min(budget, self.context_length - len(prompt_ids))
        with torch.inference_mode():
            return self._decode(list(prompt_ids), budget, streamer)

    def _decode(self, prompt_ids: list[int], budget: int, streamer) -> GenerationResult:
        d = Decoding(
            model=self.model,
            config=self.config,
            # room for the whole generation and what a step writes past it, so the cache never reallocates
            cache=layers.new_cache(len(prompt_ids) + budget + self.strategy.cache_room(self.config, budget)),
            sequence=list(prompt_ids),
            processors=processors(self.config),
            generator=self.random,
            stop_ids=self.stop.token_ids,
            on_draft=getattr(streamer, "put_draft", None),
            compiled=self.compiled,
        )
        result = GenerationResult(
            prompt_tokens=len(prompt_ids), tokens=[], text="", stop_reason="max_steps", drafted=0, accepted=0,
            steps=0, total_time=0.0, time_to_first_token=0.0,
        )
        generated = result.tokens
        sync_device(self.device)
        start = time.perf_counter()
        try:
            logits = self.strategy.prefill(d, torch.tensor([prompt_ids], device=self.device))
            new_tokens = [d.choose(d.scores(logits, []))]
            while True:
                reason = None
                for i, token in enumerate(new_tokens):
                    generated.append(token)
                    d.sequence.append(token)
                    reason = self.stop.reason(generated)
                    if reason is not None:
                        new_tokens = new_tokens[: i + 1]
                        break
                if result.steps == 0:
                    sync_device(self.device)
                    result.time_to_first_token = time.perf_counter() - start
                if streamer is not None:
                    streamer.put(torch.tensor(new_tokens))
                if reason is None and len(generated) >= budget:
                    reason = "max_steps" if budget == self.config.max_steps else "context_length"
                if reason is not None:
                    result.stop_reason = reason
                    break
                step = self.strategy.step(d, budget - len(generated))
                result.steps += 1
                result.drafted += step.drafted
                result.accepted += step.accepted
                new_tokens = step.tokens
        finally:
            sync_device(self.device)
            result.total_time = time.perf_counter() - start
            result.cache_bytes = layers.cache_bytes(d.cache)
            if streamer is not None:
                streamer.end()
        return result
