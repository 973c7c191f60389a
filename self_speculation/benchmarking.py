"""The runners a benchmark compares on the same prompts: ours (the strategy table) and Hugging Face's peers."""

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import CompileConfig, StopStringCriteria, StoppingCriteriaList

from .config import GenerationConfig
from .costs import CostMeter, sync_device
from .generator import Generator, context_length, token_budget
from .stopping import StopCondition
from .strategies import STRATEGIES, SelfSpeculative, configured


@dataclass
class Sample:
    strategy: str
    prompt_id: int
    tokens: list[int]
    total_time: float
    time_to_first_token: float | None = None
    drafted: int = 0
    accepted: int = 0
    passes: int = 0  # full-model passes (prompt pass included) for our strategies
    steps: int = 0  # decoding steps after the prompt's pass (our strategies): what their cost models price
    cache_bytes: int | None = None  # keys and values the KV cache held at its largest (our strategies)
    peak_gpu_bytes: int | None = None  # peak GPU memory allocated during the run, weights included (CUDA only)
    batch: int = -1  # samples of one batch (>= 0) were generated together: `total_time` is the batch's wall time
    step_drafts: dict[int, int] = dataclasses.field(default_factory=dict)  # drafts in a step -> steps (ours)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.total_time if self.total_time > 0 else 0.0


@dataclass
class Batch:
    """Prompts decoded together, and their positions among all the prompts."""

    ids: list[int]
    prompts: list[list[int]]


def batches(prompts: list[list[int]], size: int, by_length: bool = True) -> list[Batch]:
    """The prompts in batches of `size`. `by_length`: prompts of similar lengths together (in order of length),
    so that a batch attends over little padding: rows are as long as the batch's longest prompt. One prompt per
    batch has no padding, and keeps the dataset's order."""
    grouped = by_length and size > 1
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if grouped else list(range(len(prompts)))
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    return [Batch(ids, [prompts[i] for i in ids]) for ids in chunks]


@dataclass
class Runner:
    run: Callable[[list[int]], Sample]  # prompt ids -> sample (strategy and prompt_id filled in by the caller)
    settings: dict  # the effective settings, recorded in the results
    # several prompts at once -> a sample per prompt; None: the runner takes one prompt at a time, for the reason
    # `alone` gives (printed under a batched benchmark's table)
    run_together: Callable[[list[list[int]]], list[Sample]] | None = None
    alone: str | None = None
    generator: Generator | None = None  # ours: its strategy adds metrics and report lines
    variant: str = ""  # its suffix among a benchmark's variants (`variant_runners`): "+compiled", "+adaptive"...
    baseline: str = ""  # the variant of the rows it is measured against (hf_generate, autoregressive): compiled or not
    # what it varies: e.g. "eager" -> ("compiled", the eager row); "static" -> ("adaptive", the row with static)
    siblings: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    compiles: bool = True  # False: --compile changes nothing in this runner (no compiled variant of it is run)
    # what makes a batch's first run cost more than the next (None: nothing, or ours' `Generator.compile_key`)
    warm_key: Callable[[list[list[int]]], object] | None = None

    def run_batch(self, batch: Batch, index: int = 0) -> list[Sample]:
        """Batch number `index` as one batch, or one prompt after another where the runner takes one at a time.
        Samples carry their prompt's id; those generated together share `batch`."""
        if self.run_together is None:
            samples = [self.run(p) for p in batch.prompts]
        else:
            samples = [dataclasses.replace(s, batch=index) for s in self.run_together(batch.prompts)]
        return [dataclasses.replace(s, prompt_id=i) for i, s in zip(batch.ids, samples)]

    def warm_up(self, batches: list[Batch], runs: int) -> None:
        """`runs` untimed runs of the first batch; then one of each batch of another `warm_key`: with --compile,
        where the passes compile, one that needs code the first did not compile (`Generator.compile_key`: a lone
        prompt after batches, with CUDA graphs another batch size or cache bucket), so that nothing compiles inside
        a timed run."""
        for _ in range(runs):
            self.run_batch(batches[0])
        key = self.warm_key
        if key is None and self.generator is not None and self.generator.compiled is not None:
            key = self.generator.compile_key
        if runs and key is not None:
            seen = {key(batches[0].prompts)}
            for batch in batches[1:]:
                if (found := key(batch.prompts)) not in seen:
                    seen.add(found)
                    self.run_batch(batch)


def _ours(name: str):
    """A runner of our strategy `name`, given the flags it uses (a benchmark passes one set to every strategy)."""

    def build(model, tokenizer, config: GenerationConfig, seed: int) -> Runner:
        generator = Generator(model, tokenizer, STRATEGIES[name]().own(config), seed=seed)

        full_passes = 1 if generator.strategy.full_model else 0  # per step, and for the prompt

        def sample(r, peak) -> Sample:
            return Sample(name, -1, r.tokens, r.total_time, r.time_to_first_token, r.drafted, r.accepted,
                          full_passes * (r.steps + 1), r.steps, r.cache_bytes, peak.get("bytes"),
                          step_drafts=dict(r.step_drafts))  # a plain dict: asdict cannot copy a Counter

        def run(prompt_ids):
            with _peak_gpu_memory(generator.device) as peak:
                r = generator.generate_ids(prompt_ids)
            return sample(r, peak)

        def run_together(prompts):
            with _peak_gpu_memory(generator.device) as peak:
                results = generator.generate_batch(prompts)
            return [sample(r, peak) for r in results]

        return Runner(run, dataclasses.asdict(generator.config), run_together, generator=generator)

    return build


def cost_meter(runners: dict[str, Runner], variant: str = "") -> CostMeter | None:
    """What times the passes beside a benchmark's runs of one variant (eager, or "+compiled"): the generator of
    ours whose cost model needs the most passes timed, its decoder and compiled passes; None without ours."""
    ours = [r.generator for r in runners.values() if r.generator is not None and r.baseline == variant]
    if not ours:
        return None
    needs = {id(g): g.strategy.timed_passes(g.config) for g in ours}
    chosen = max(ours, key=lambda g: (needs[id(g)][1], needs[id(g)][0] is not None))
    return CostMeter(chosen, *needs[id(chosen)])


def decoded_context(prompts: list[list[int]], samples: list[Sample]) -> int:
    """The cache a batch's steps attended over, on average: each row's prompt and half of what it generated."""
    return round(statistics.mean(len(prompts[s.prompt_id]) + len(s.tokens) / 2 for s in samples))


def _hf_stop(tokenizer, config: GenerationConfig, kwargs: dict) -> StopCondition:
    """Where a Hugging Face row ends, by our rule: its end-of-sequence ids and stop words, as `_hf_kwargs` gave
    them to generate (in a batch, a row that stopped early is filled with padding up to the longest)."""
    return StopCondition(kwargs.get("eos_token_id") or (), (), config.stop_words,
                         tokenizer.decode if tokenizer is not None else None)


def _hf_kwargs(model, tokenizer, config: GenerationConfig) -> dict:
    kwargs = {"max_new_tokens": config.max_steps, "do_sample": config.sample}
    if config.sample:
        kwargs |= {"temperature": config.temperature, "top_k": config.top_k or None, "top_p": config.top_p}
    if config.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = config.no_repeat_ngram_size
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    eos += [t for t in config.stop_token_ids if t not in eos]
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    kwargs["eos_token_id"] = eos or None
    kwargs["pad_token_id"] = model.generation_config.pad_token_id or (eos[0] if eos else 0)
    if config.stop_words:
        # as a criterion, not `stop_strings`: assisted generation hands its generation config to the assistant's
        # own generate without the tokenizer that stop strings need, and fails
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopStringCriteria(tokenizer, config.stop_words)])
    return kwargs


def _recorded(kwargs: dict) -> dict:
    """generate()'s arguments as a run's JSON records them."""
    settings = {k: v for k, v in kwargs.items() if k != "stopping_criteria"}
    if "stopping_criteria" in kwargs:
        settings["stop_strings"] = list(kwargs["stopping_criteria"][0].stop_strings)
    return settings


def _hf_run(name: str, model, kwargs: dict, stop: StopCondition, patch: dict | None = None):
    """model.generate over a batch of prompts, left-padded (one prompt: no padding); a sample per prompt, cut where
    `stop` ends it (the rest is padding) or at its budget: --max_steps, or less where the model's context ends
    first, as our generator gives it (generate gives every row of a batch the largest)."""
    device, context = model.lm_head.weight.device, context_length(model)

    def cut(row: list[int], budget: int) -> list[int]:
        row = row[:budget]
        return row[: next((i + 1 for i in range(len(row)) if stop.reason(row[: i + 1]) is not None), len(row))]

    def run_together(prompts):
        budgets = [token_budget(kwargs["max_new_tokens"], context, len(p)) for p in prompts]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[kwargs["pad_token_id"]] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        saved = {k: getattr(model.generation_config, k, None) for k in (patch or {})}
        try:
            for key, value in (patch or {}).items():
                setattr(model.generation_config, key, value)
            with _peak_gpu_memory(device) as peak:
                sync_device(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(ids, attention_mask=mask, **kwargs | {"max_new_tokens": max(budgets)})
                sync_device(device)
                elapsed = time.perf_counter() - start
        finally:
            for key, value in saved.items():
                setattr(model.generation_config, key, value)
        return [Sample(name, -1, cut(row, b), elapsed, peak_gpu_bytes=peak.get("bytes"))
                for row, b in zip(out[:, width:].tolist(), budgets)]

    return (lambda prompt_ids: run_together([prompt_ids])[0]), run_together


@contextmanager
def _peak_gpu_memory(device: torch.device):
    """Yields a dict that holds, after the block, the peak bytes allocated on a CUDA device during it."""
    peak = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield peak
    if device.type == "cuda":
        peak["bytes"] = torch.cuda.max_memory_allocated(device)


def _hf_generate(model, tokenizer, config, seed) -> Runner:
    """model.generate greedy or sampling; with --compile, Hugging Face's own compiled decoding (a static cache and
    its forward compiled by generate), so that compiled runs of ours meet a compiled baseline."""
    kwargs = _hf_kwargs(model, tokenizer, config)
    settings = _recorded(kwargs)
    if config.compile:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # generate compiles only on accelerators unless told so
        kwargs |= {"cache_implementation": "static", "compile_config": compile_config}
        settings |= {"cache_implementation": "static", "compile_config": compile_config.to_dict()}
    run, run_together = _hf_run("hf_generate", model, kwargs, _hf_stop(tokenizer, config, kwargs))
    return Runner(run, settings, run_together)


class _InternalDeprecation(logging.Filter):
    """Drops transformers' notice that generate was given a generation config together with generation arguments
    when transformers itself does it (its assisted generation calls the assistant's generate that way): a
    warning the user cannot act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passing `generation_config` together with generation-related")


def _hf_assistant_early_exit(model, tokenizer, config, seed) -> Runner:
    """Hugging Face's LayerSkip: the first E layers draft with their own cache, the full model verifies. Its draft
    length is read from the model's generation config (not from generate() arguments), so it is set there for the
    call and restored; its confidence-based early stop is switched off to draft exactly d tokens like ours."""
    _, speculative = configured(SelfSpeculative().own(config), model.config)
    kwargs = _hf_kwargs(model, tokenizer, config) | {"assistant_early_exit": speculative.exit_layer}
    patch = {
        "num_assistant_tokens": speculative.num_speculations,
        "num_assistant_tokens_schedule": "constant",
        "assistant_confidence_threshold": 0.0,
    }
    settings = _recorded(kwargs) | patch
    generation_logger = logging.getLogger("transformers.generation.utils")
    if not any(isinstance(f, _InternalDeprecation) for f in generation_logger.filters):
        generation_logger.addFilter(_InternalDeprecation())
    run, _ = _hf_run("hf_assistant_early_exit", model, kwargs, _hf_stop(tokenizer, config, kwargs), patch)
    return Runner(run, settings, alone="Hugging Face's assisted generation takes a batch of one", compiles=False)


def _hf_custom_generate(model, tokenizer, config, seed) -> Runner:
    """model.generate with this toolkit's self-speculative decoding as its decoding loop (`custom_generate`,
    self_speculation/hf.py), left-padded batches as Hugging Face users pass them: what the route costs over our own
    runner. Eager only: its compiled passes would compile per batch shape inside timed runs (our runner warms up
    each one)."""
    from .hf import layerskip_generate

    kwargs = _hf_kwargs(model, tokenizer, config)
    stop = _hf_stop(tokenizer, config, kwargs)
    if kwargs.pop("stopping_criteria", None) is not None:  # the route takes stop strings and their tokenizer
        kwargs |= {"stop_strings": config.stop_words, "stop_strings_tokenizer": tokenizer}
    options = {"generation_strategy": "self_speculative", "draft_policy": config.draft_policy,
               "batch_drafts": config.batch_drafts, "seed": seed}
    options |= {name: getattr(config, name) for name in ("exit_layer", "num_speculations")
                if getattr(config, name) != -1}  # -1: the route takes the checkpoint's recommendation
    settings = {k: v for k, v in kwargs.items() if k != "stop_strings_tokenizer"} | options
    run, run_together = _hf_run("hf_custom_generate", model, kwargs | options | {"custom_generate": layerskip_generate},
                                stop)
    # the first batch of each size times the draft policy's passes at that size inside generate's call (ours
    # does it before its clock starts): warmed up once per batch size
    return Runner(run, settings | {"custom_generate": "self_speculation.hf.layerskip_generate"}, run_together,
                  compiles=False, warm_key=len)


COMPILED = "+compiled"


def variant_runners(strategies: list[str], variants: list[tuple], model, tokenizer, config: GenerationConfig,
                    seed: int) -> tuple[dict[str, Runner], list[str]]:
    """Every strategy under every variant that changes it (`arguments.pop_variants`: per axis a (suffix part, flag,
    value)), as NAME+SUFFIX; a variant of a flag the runner does not read is the same runner, run once. Each row
    knows its siblings: the row with one axis at its first value ("eager", "static"), which it is compared with.
    Also returns the strategies that have no compiled variant (run eager only)."""
    runners, eager_only = {}, []
    firsts = {flag: part for part, flag, _ in variants[0]}  # every axis at its first value
    for name in strategies:
        for variant in variants:
            parts = [(part, flag, value) for part, flag, value in variant
                     if flag == "compile" or flag in RUNNER_FLAGS[name]]
            suffix = "".join(part for part, _, _ in parts)
            if name + suffix in runners or (COMPILED in suffix and name in eager_only):
                continue
            effective = dataclasses.replace(config, **{f: v for _, f, v in parts})
            runner = RUNNERS[name](model, tokenizer, effective, seed)
            if effective.compile and not runner.compiles:  # said once; with --compile both its eager rows stand
                eager_only += [name] if name not in eager_only else []
                if COMPILED in suffix:
                    continue
            siblings = {(firsts[flag] or "+eager")[1:]: (part[1:], name + suffix.replace(part, firsts[flag]))
                        for part, flag, _ in parts if part != firsts[flag]}
            runners[name + suffix] = dataclasses.replace(runner, variant=suffix, siblings=siblings,
                                                         baseline=COMPILED if COMPILED in suffix else "")
    return runners, eager_only


# what each runner reads of the strategy flags (STRATEGY_FLAGS): a benchmark warns of one none of its runners reads
RUNNER_FLAGS = {name: strategy.flags for name, strategy in STRATEGIES.items()} | {
    "hf_generate": frozenset(), "hf_assistant_early_exit": frozenset({"exit_layer", "num_speculations"}),
    "hf_custom_generate": STRATEGIES["self_speculative"].flags}

RUNNERS: dict[str, Callable] = {
    **{name: _ours(name) for name in STRATEGIES},
    "hf_generate": _hf_generate,
    "hf_assistant_early_exit": _hf_assistant_early_exit,
    "hf_custom_generate": _hf_custom_generate,
}


def profile(runner: Runner, prompt_ids: list[int], rows: int = 8) -> dict:
    """One generation under torch.profiler: the operators Python dispatches per generated token (top-level aten
    calls; the prompt pass included) and the operators taking most self time. The profiler's own overhead
    inflates the times; the counts and shares are what compare."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        tokens = max(len(runner.run(prompt_ids).tokens), 1)
    dispatched = [e for e in prof.events() if e.name.startswith("aten::")
                  and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {
        "operators_per_token": len(dispatched) / tokens,
        "operator_time_per_token_us": total / tokens,
        "top": [{"operator": e.key, "share": e.self_cpu_time_total / total, "us_per_token": e.self_cpu_time_total / tokens}
                for e in top],
    }


def record(sample, tokenizer) -> dict:
    return dataclasses.asdict(sample) | {"num_tokens": len(sample.tokens), "tokens_per_second": sample.tokens_per_second,
                                         "output": tokenizer.decode(sample.tokens, skip_special_tokens=True)}
