"""The generator: prompt in, tokens, text and speed figures out."""

import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import layers
from .config import GenerationConfig
from .costs import sync_device, typical_context
from .errors import UsageError, check_range, check_text
from .sampling import Processing
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
    cache_bytes: int = 0  # what the KV cache held at its largest (a batch's: all rows, before any left)
    step_drafts: Counter = field(default_factory=Counter)  # drafts in a step -> its steps with that many

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


# Finished rows leave the batch (their cache rows dropped) rather than being held in it: measured on the embedded
# model with HumanEval's stop words, 25 of 32 rows stopping early, dropping was 1.3-1.6x faster (docs/benchmarks.md).
SHRINK_BATCHES = True


def context_length(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _too_long(length: int, context: int | None) -> str | None:
    """Why a prompt of `length` tokens cannot be continued, or None: it must leave room for one new token."""
    if context is not None and length >= context:
        return f"the prompt is {length} tokens long; the model's context is {context} tokens"
    return None


def token_budget(max_steps: int, context: int | None, prompt_length: int) -> int:
    """How many tokens a prompt may get: --max_steps, or less where the model's context ends first. Every runner of
    a benchmark, ours and Hugging Face's, gets this budget."""
    return max_steps if context is None else min(max_steps, context - prompt_length)


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
    derived from both: the strategy, the model's decoder (its layers' weights) and, with --compile, its compiled
    passes."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None,
        config: GenerationConfig,
        seed: int = 42,
        eos_token_ids: set[int] | None = None,
    ):
        """`eos_token_ids`: the end-of-sequence ids; None: the model's generation config's and the tokenizer's."""
        layers.check_layout(model)
        self.strategy, config = configured(config, model.config)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.decoder = layers.Decoder(model)
        passes = self.strategy.passes(config, self.decoder.num_layers) if config.compile else ()
        self.compiled = layers.CompiledPasses(self.decoder, passes) if passes else None
        self.graphs = self.compiled is not None and self.compiled.graphs
        self.caches: dict[tuple[int, int], layers.KVCache] = {}  # with CUDA graphs: (rows, capacity) -> cache
        self.device = self.decoder.device
        self.seed = seed
        self.drawn = 0  # prompts sampled from so far: the next one's noise stream (`sampling.race_noise`)
        self.context_length = context_length(model)
        eos = eos_token_ids
        if eos is None:
            eos = _token_ids(model.generation_config.eos_token_id if model.generation_config else None)
            if tokenizer is not None:
                eos |= _token_ids(tokenizer.eos_token_id)
        self.stop = StopCondition(
            eos,
            config.stop_token_ids,
            config.stop_words,
            decode=tokenizer.decode if tokenizer is not None else None,
        )

    def _streams(self, rows: int) -> torch.Tensor | None:
        """When sampling, the noise streams of the next `rows` prompts: the seed and each prompt's number among
        those this generator has sampled from, so that a prompt draws the same tokens in any batch."""
        if not self.config.sample:
            return None
        streams = [(self.seed << 32) + self.drawn + b for b in range(rows)]
        self.drawn += rows
        return layers.upload([s % (1 << 63) for s in streams], self.device)

    def _budgets(self, prompts: list[list[int]], max_steps: int) -> tuple[list[int], int]:
        """Each prompt's budget of new tokens (`max_steps`, or less where the context ends first), and the cache
        capacity of their generation: room for all of it and what a step writes past it, so that the cache never
        grows."""
        budgets = [token_budget(max_steps, self.context_length, len(p)) for p in prompts]
        room = self.strategy.cache_room(self.config, max(budgets))
        return budgets, max(len(p) for p in prompts) + max(budgets) + room

    def compile_key(self, prompts: list[list[int]]) -> tuple | None:
        """What decides the compiled code a generation of `prompts` runs (and with CUDA graphs, the cache and the
        graphs it replays): generations of one key compile nothing the first did not. None without --compile.
        A benchmark warms up once per key, so that nothing compiles inside a timed run."""
        if self.compiled is None:
            return None
        if not self.graphs:
            return (len(prompts) > 1,)  # a batch's passes serve every batch size from 2
        return len(prompts), layers.capacity_bucket(self._budgets(prompts, self.config.max_steps)[1])

    def new_cache(self, capacity: int, rows: int) -> layers.KVCache:
        """A cache for a generation, or for timing this generator's passes: new, or with CUDA graphs the one of
        this size and capacity bucket it keeps (`layers.graph_cache`)."""
        return layers.graph_cache(self.caches, capacity, rows) if self.graphs else layers.new_cache(capacity, rows)

    def generate(self, prompt: str, streamer=None) -> GenerationResult:
        if not prompt.strip():
            raise UsageError("the prompt is empty")
        prompt_ids = self.tokenizer(check_text(prompt, "the prompt")).input_ids
        result = self.generate_ids(prompt_ids, streamer)
        result.text = self.tokenizer.decode(result.tokens, skip_special_tokens=True)
        return result

    def generate_ids(self, prompt_ids: list[int], streamer=None) -> GenerationResult:
        """Generate from token ids; `result.text` stays empty (no tokenizer involved). A batch of one."""
        if prompt_ids and (reason := _too_long(len(prompt_ids), self.context_length)) is not None:
            raise UsageError(reason)
        return self.generate_batch([prompt_ids], streamer=streamer)[0]

    @staticmethod
    def _new_result(prompt_tokens: int) -> GenerationResult:
        return GenerationResult(prompt_tokens=prompt_tokens, tokens=[], text="", stop_reason="running", drafted=0,
                                accepted=0, steps=0, total_time=0.0, time_to_first_token=0.0)

    def _extend(self, result: GenerationResult, sequence: list[int], new_tokens: list[int], budget: int,
                max_steps: int) -> list[int]:
        """Append a step's tokens to the result and the sequence up to a stop or the budget, and set
        `stop_reason` if the generation ends there; returns the tokens taken."""
        for i, token in enumerate(new_tokens):
            result.tokens.append(token)
            sequence.append(token)
            reason = self.stop.reason(result.tokens)
            if reason is None and len(result.tokens) >= budget:
                reason = "max_steps" if budget == max_steps else "context_length"
            if reason is not None:
                result.stop_reason = reason
                return new_tokens[: i + 1]
        return new_tokens

    def _kept_rows(self, running: list[bool]) -> list[int]:
        """The rows a shrinking batch keeps: those still running, and with --compile at least two, a finished row
        held beside a lone running one (a compiled pass serves every batch size from 2: a lone row would compile
        again, in the middle of a timed run)."""
        kept = [b for b, go in enumerate(running) if go]
        if self.graphs:  # CUDA graphs replay over the buffers they were recorded with: rows stay where they are
            return list(range(len(running)))
        if len(kept) == 1 and self.compiled is not None and len(running) > 1:
            kept = sorted(kept + [running.index(False)])
        return kept

    def generate_batch(self, prompts: list[list[int]], shrink: bool = SHRINK_BATCHES, streamer=None,
                       max_steps: int | None = None) -> list[GenerationResult]:
        """Generate from prompts (token ids) at once, in one cache: the one decoding loop (one prompt is a batch
        of one). Each row's tokens are what it gets alone. Every result's `total_time` is the batch's wall time
        (throughput is the tokens of all rows over it). A row that has stopped leaves the batch (`shrink`), or is
        held in place, keeping none of its steps, until the others stop. A `streamer` shows a single prompt's
        tokens (and drafts) as they come. `max_steps` replaces --max_steps for this generation (Hugging Face's
        generate, through `hf.layerskip_generate`, gives each call its own budget)."""
        if not prompts or any(not p for p in prompts):
            raise UsageError("the prompt is empty")
        if streamer is not None and len(prompts) > 1:
            raise ValueError("a streamer shows one prompt's generation")
        check_prompt_lengths(self.model, prompts)
        if max_steps is None:
            max_steps = self.config.max_steps
        check_range("max_steps", max_steps, 1)
        budgets, capacity = self._budgets(prompts, max_steps)
        lengths = [len(p) for p in prompts]
        plans = self.strategy.begin(self, len(prompts), typical_context(lengths, max(budgets)))
        d = Decoding(decoder=self.decoder, config=self.config, cache=self.new_cache(capacity, len(prompts)),
                     sequences=[list(p) for p in prompts], processing=Processing(self.config),
                     streams=self._streams(len(prompts)),
                     stop_ids=self.stop.token_ids, on_draft=getattr(streamer, "put_draft", None),
                     compiled=self.compiled, plans=plans)
        results = all_results = [self._new_result(len(p)) for p in prompts]
        padded = layers.upload([p + [p[-1]] * (max(lengths) - len(p)) for p in prompts], self.device)
        first, largest = None, 0
        with torch.inference_mode():
            sync_device(self.device)
            start = time.perf_counter()
            try:
                logits = self.strategy.prefill(d, padded, lengths)  # (B, V)
                new_tokens = [[token] for token in d.take(logits)]
                while True:
                    for b, result in enumerate(results):
                        if result.stop_reason == "running":
                            taken = self._extend(result, d.sequences[b], new_tokens[b], budgets[b], max_steps)
                            if streamer is not None:
                                streamer.put(torch.tensor(taken))
                    if first is None:
                        sync_device(self.device)
                        first = time.perf_counter() - start
                    running = [r.stop_reason == "running" for r in results]
                    if not any(running):
                        break
                    if shrink and (kept := self._kept_rows(running)) != list(range(len(results))):
                        largest = max(largest, layers.cache_bytes(d.cache))
                        d.keep_rows(kept)
                        results, budgets, running = ([xs[b] for b in kept] for xs in (results, budgets, running))
                    remaining = [budget - len(r.tokens) if go else 1 for budget, r, go in zip(budgets, results, running)]
                    d.idle = [not go for go in running]  # stopped rows, when kept, stay where they are
                    steps = self.strategy.step(d, remaining)
                    for step, result, go in zip(steps, results, running):
                        if go:
                            result.steps += 1
                            result.drafted += step.drafted
                            result.accepted += step.accepted
                            result.step_drafts[step.drafted] += 1
                    new_tokens = [step.tokens for step in steps]
            finally:
                sync_device(self.device)
                elapsed = time.perf_counter() - start
                if streamer is not None:
                    streamer.end()
        for result in all_results:
            result.total_time, result.time_to_first_token = elapsed, first
            result.cache_bytes = max(largest, layers.cache_bytes(d.cache))
        return all_results
