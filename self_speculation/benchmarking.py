"""Running several generation strategies side by side on the same prompts: ours and Hugging Face's peers."""

import dataclasses
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import CompileConfig

from . import layers
from .config import GenerationConfig
from .costs import PassCosts
from .equivalence import tally
from .generator import Generator, sync_device
from .metrics import quality
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
    cache_bytes: int | None = None  # memory the KV cache held at the end (our strategies)
    peak_gpu_bytes: int | None = None  # peak GPU memory allocated during the run, weights included (CUDA only)
    batch: int = -1  # samples of one batch (>= 0) were generated together: `total_time` is the batch's wall time

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
    so that a batch attends over little padding: rows are as long as the batch's longest prompt."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if by_length else list(range(len(prompts)))
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

    def run_batch(self, batch: Batch, index: int = 0) -> list[Sample]:
        """Batch number `index` as one batch, or one prompt after another where the runner takes one at a time.
        Samples carry their prompt's id; those generated together share `batch`."""
        if len(batch.prompts) == 1 or self.run_together is None:
            samples = [self.run(p) for p in batch.prompts]
        else:
            samples = [dataclasses.replace(s, batch=index) for s in self.run_together(batch.prompts)]
        return [dataclasses.replace(s, prompt_id=i) for i, s in zip(batch.ids, samples)]


def _ours(name: str):
    """A runner of our strategy `name`, given the flags it uses (a benchmark passes one set to every strategy)."""

    def build(model, tokenizer, config: GenerationConfig, seed: int) -> Runner:
        generator = Generator(model, tokenizer, STRATEGIES[name]().own(config), seed=seed)

        def sample(r, peak) -> Sample:
            return Sample(name, -1, r.tokens, r.total_time, r.time_to_first_token, r.drafted, r.accepted,
                          r.steps + 1, r.cache_bytes, peak.get("bytes"))

        def run(prompt_ids):
            with _peak_gpu_memory(generator.device) as peak:
                r = generator.generate_ids(prompt_ids)
            return sample(r, peak)

        def run_together(prompts):
            with _peak_gpu_memory(generator.device) as peak:
                results = generator.generate_batch(prompts)
            return [sample(r, peak) for r in results]

        return Runner(run, dataclasses.asdict(generator.config), run_together)

    return build


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
        kwargs |= {"stop_strings": config.stop_words, "tokenizer": tokenizer}
    return kwargs


def _hf_run(name: str, model, kwargs: dict, patch: dict | None = None):
    """model.generate over a batch of prompts, left-padded (one prompt: no padding); a sample per prompt, cut after
    its first end-of-sequence token (the rest is padding)."""
    device = model.lm_head.weight.device
    eos = set(kwargs.get("eos_token_id") or [])

    def run_together(prompts):
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
                    out = model.generate(ids, attention_mask=mask, **kwargs)
                sync_device(device)
                elapsed = time.perf_counter() - start
        finally:
            for key, value in saved.items():
                setattr(model.generation_config, key, value)
        rows = [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in out[:, width:].tolist()]
        return [Sample(name, -1, row, elapsed, peak_gpu_bytes=peak.get("bytes")) for row in rows]

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
    settings = {k: v for k, v in kwargs.items() if k != "tokenizer"}
    if config.compile:
        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # generate compiles only on accelerators unless told so
        kwargs |= {"cache_implementation": "static", "compile_config": compile_config}
        settings |= {"cache_implementation": "static", "compile_config": compile_config.to_dict()}
    run, run_together = _hf_run("hf_generate", model, kwargs)
    return Runner(run, settings, run_together)


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
    settings = {k: v for k, v in kwargs.items() if k != "tokenizer"} | patch
    run, _ = _hf_run("hf_assistant_early_exit", model, kwargs, patch)
    return Runner(run, settings, alone="Hugging Face's assisted generation takes a batch of one")


RUNNERS: dict[str, Callable] = {
    **{name: _ours(name) for name in STRATEGIES},
    "hf_generate": _hf_generate,
    "hf_assistant_early_exit": _hf_assistant_early_exit,
}


class PassTimer:
    """Times passes of layers over a cache holding `context` positions, as decoding runs them (through
    torch.compile for the `compiled` shapes); every pass is rolled back after it, so the context stays put."""

    def __init__(self, model, context: int, max_positions: int, compiled=(), repeats: int = 15):
        self.model, self.repeats = model, repeats
        self.device = model.lm_head.weight.device
        self.cache = layers.new_cache(context + max_positions)
        self.compiled = layers.CompiledPasses(model, compiled)
        with torch.inference_mode():
            layers.full_forward(model, torch.zeros((1, context), dtype=torch.long, device=self.device), self.cache)

    @torch.inference_mode()
    def median_time(self, start: int, end: int, positions: int, with_head: bool = False) -> tuple[float, float]:
        """Median seconds of the layers [start, end) over `positions` new positions, and of the head after them."""
        hidden = layers.embed(self.model, torch.zeros((1, positions), dtype=torch.long, device=self.device))
        times = []
        for _ in range(self.repeats + 2):  # the first two warm up
            sync_device(self.device)
            begin = time.perf_counter()
            out = layers.run_layers(self.model, hidden, self.cache, start, end, self.compiled)
            sync_device(self.device)
            middle = time.perf_counter()
            if with_head:
                layers.head(self.model, out)
                sync_device(self.device)
            times.append((middle - begin, time.perf_counter() - middle))
            for layer in self.cache.layers[start:end]:
                layer.crop(-positions)
        return tuple(statistics.median(t[i] for t in times[2:]) for i in (0, 1))

    def costs(self, exit_layer: int, max_positions: int, full: float | None = None) -> PassCosts:
        """The passes of self-speculation at `exit_layer`; `full` reuses a full pass timed before."""
        count = layers.num_layers(self.model)
        verify, head = {}, {}
        for positions in range(1, max_positions + 1):
            verify[positions], head[positions] = self.median_time(exit_layer, count, positions, with_head=True)
        draft = self.median_time(0, exit_layer, 1)[0]
        return PassCosts(draft, verify, self.median_time(0, count, 1)[0] if full is None else full, head)


def measure_pass_costs(model, context: int, exit_layer: int, max_positions: int, compiled: bool = False,
                       repeats: int = 15) -> PassCosts:
    """Median times of the passes of `PassCosts` after `context` cached positions, run as decoding runs them
    (through torch.compile for the compiled shapes when `compiled`)."""
    count = layers.num_layers(model)
    passes = {(0, exit_layer, 1), (exit_layer, count, max_positions), (0, count, 1)} if compiled else ()
    return PassTimer(model, context, max_positions, passes, repeats).costs(exit_layer, max_positions)


def summarize(samples: list[Sample]) -> dict:
    """Speed metrics of one strategy over its samples: medians over batches (a sample alone is a batch of one;
    a batch's throughput is the tokens of all its rows over its wall time), totals over all of them."""
    tokens = sum(len(s.tokens) for s in samples)
    batches: dict[int, list[Sample]] = {}
    for i, s in enumerate(samples):
        batches.setdefault(s.batch if s.batch >= 0 else -1 - i, []).append(s)
    times = [(sum(len(s.tokens) for s in rows), rows[0].total_time) for rows in batches.values()]
    total_time = sum(t for _, t in times)
    drafted = sum(s.drafted for s in samples)
    passes = sum(s.passes for s in samples)
    first = [s.time_to_first_token for s in samples if s.time_to_first_token is not None]
    return {
        "samples": len(samples),
        "rows_per_batch": max(len(rows) for rows in batches.values()),
        "tokens": tokens,
        "tokens_per_second_median": statistics.median(n / t if t > 0 else 0.0 for n, t in times),
        "tokens_per_second_overall": tokens / total_time if total_time else 0.0,
        "time_per_token_median": statistics.median(t / max(n, 1) for n, t in times),
        "total_time": total_time,
        "time_to_first_token_median": statistics.median(first) if first else None,
        "acceptance_rate": sum(s.accepted for s in samples) / drafted if drafted else None,
        "tokens_per_full_model_pass": tokens / passes if passes else None,
        "kv_cache_bytes_max": max((s.cache_bytes for s in samples if s.cache_bytes is not None), default=None),
        "peak_gpu_bytes_max": max((s.peak_gpu_bytes for s in samples if s.peak_gpu_bytes is not None), default=None),
    }


def speculation_report(model, metrics: dict, samples: list[Sample], settings: dict, context: int) -> dict:
    """For self_speculative: the ideal speedup for its measured acceptance and this machine's pass costs, the
    measured speedup over our autoregressive decoding (same layer code, so the ratio is the speculation's own
    gain), the efficiency (measured / ideal) and the KV cache against autoregressive decoding's."""
    drafts = min(settings["num_speculations"], settings["max_steps"] - 1)  # a step never drafts past the budget
    costs = measure_pass_costs(model, context, settings["exit_layer"], drafts + 1, compiled=settings.get("compile", False))
    ideal = SelfSpeculative().ideal_speedup(costs, steps=sum(s.passes - 1 for s in samples),
                                            drafted=sum(s.drafted for s in samples),
                                            accepted=sum(s.accepted for s in samples))
    report = {"ideal_speedup_vs_autoregressive": ideal, "pass_costs_seconds": dataclasses.asdict(costs) | {"context": context}}
    plain = metrics.get("autoregressive")
    if plain:
        mine = metrics["self_speculative"]
        speedup = mine["tokens_per_second_median"] / plain["tokens_per_second_median"]
        report |= {"speedup_vs_autoregressive": speedup, "efficiency": speedup / ideal}
        if mine["kv_cache_bytes_max"] and plain["kv_cache_bytes_max"]:
            report["kv_cache_vs_autoregressive"] = mine["kv_cache_bytes_max"] / plain["kv_cache_bytes_max"]
        if mine["peak_gpu_bytes_max"] and plain["peak_gpu_bytes_max"]:
            report["peak_gpu_memory_vs_autoregressive"] = mine["peak_gpu_bytes_max"] / plain["peak_gpu_bytes_max"]
    return report


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


def compare(model, tokenizer, config: GenerationConfig, runners: dict[str, Runner], samples: list[Sample],
            prompts: list[list[int]], references: list[str]) -> dict:
    """The metrics of every strategy: speed, quality against the references, speedup over hf_generate and, when
    greedy, its outputs against hf_generate's (near ties and divergences apart); for self_speculative also the
    report of its own gain (`speculation_report`)."""
    by_strategy = {name: sorted((s for s in samples if s.strategy == name), key=lambda s: s.prompt_id)
                   for name in runners}
    metrics = {}
    for name, strategy_samples in by_strategy.items():
        outputs = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in strategy_samples]
        metrics[name] = summarize(strategy_samples) | quality(outputs, references)
        if runners[name].alone is not None:
            metrics[name]["one_at_a_time"] = runners[name].alone
    baseline = metrics.get("hf_generate")
    for name, m in metrics.items():
        if baseline:
            m["speedup_vs_hf_generate"] = m["tokens_per_second_median"] / baseline["tokens_per_second_median"]
            if not config.sample:  # near ties: rounding flips where the two best logits are closer than it
                counts = tally(model, prompts, [s.tokens for s in by_strategy["hf_generate"]],
                               [s.tokens for s in by_strategy[name]])
                m["outputs_differing_from_hf_generate"] = counts["differing"]
                m["near_ties_vs_hf_generate"] = counts["near_ties"]
                m["divergences_vs_hf_generate"] = counts["divergences"]
    if "self_speculative" in metrics:
        context = int(statistics.median(len(p) for p in prompts)) + config.max_steps // 2
        metrics["self_speculative"] |= speculation_report(
            model, metrics, by_strategy["self_speculative"], runners["self_speculative"].settings, context)
    return metrics


def report(metrics: dict, profiles: dict) -> str:
    """What benchmark.py prints: the table, the speculation's lines, the profiles."""
    lines = [format_table(metrics)]
    if any(m["rows_per_batch"] > 1 for m in metrics.values()):
        lines += [f"{name}: one prompt at a time ({m['one_at_a_time']}); its figures are batch-1 figures"
                  for name, m in metrics.items() if "one_at_a_time" in m]
    if "self_speculative" in metrics:
        lines.append(format_speculation(metrics["self_speculative"]))
    lines += [format_profile(name, p) for name, p in profiles.items()]
    return "\n".join(lines)


def record(sample, tokenizer) -> dict:
    return dataclasses.asdict(sample) | {"num_tokens": len(sample.tokens), "tokens_per_second": sample.tokens_per_second,
                                         "output": tokenizer.decode(sample.tokens, skip_special_tokens=True)}


def format_table(metrics: dict) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| strategy | tokens/s (median) | ms/token | acceptance | tokens/pass | speedup vs hf_generate | "
             "outputs ≠ hf (near ties, divergences) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        acceptance = None if m["acceptance_rate"] is None else 100 * m["acceptance_rate"]
        lines.append(f"| {name} | {m['tokens_per_second_median']:.1f} | {1000 * m['time_per_token_median']:.2f} | "
                     f"{cell(acceptance, '.1f')}{'%' if acceptance is not None else ''} | "
                     f"{cell(m['tokens_per_full_model_pass'], '.2f')} | {cell(m.get('speedup_vs_hf_generate'), '.2f')}x | "
                     f"{differing(m)} |")
    return "\n".join(lines)


def differing(m: dict) -> str:
    if "outputs_differing_from_hf_generate" not in m:
        return "-"
    count = m["outputs_differing_from_hf_generate"]
    return f"{count} ({m['near_ties_vs_hf_generate']}, {m['divergences_vs_hf_generate']})" if count else "0"


def format_speculation(m: dict) -> str:
    """The lines under the table: the speculation's own gain against its ideal, and its memory."""
    lines = [f"self_speculative: ideal speedup over autoregressive {m['ideal_speedup_vs_autoregressive']:.2f}x "
             "(acceptance and pass costs measured here; model in README)"]
    if "speedup_vs_autoregressive" in m:
        lines[0] += f", measured {m['speedup_vs_autoregressive']:.2f}x, efficiency {100 * m['efficiency']:.0f}%"
    if "kv_cache_vs_autoregressive" in m:
        lines.append(f"self_speculative: KV cache {m['kv_cache_bytes_max'] / 2**20:.2f} MiB, "
                     f"{m['kv_cache_vs_autoregressive']:.2f}x autoregressive's")
    if "peak_gpu_memory_vs_autoregressive" in m:
        lines.append(f"self_speculative: peak GPU memory {m['peak_gpu_memory_vs_autoregressive']:.2f}x autoregressive's")
    return "\n".join(lines)


def format_profile(name: str, p: dict) -> str:
    top = ", ".join(f"{t['operator'].removeprefix('aten::')} {100 * t['share']:.0f}%" for t in p["top"][:5])
    return (f"profile {name}: {p['operators_per_token']:.0f} operators/token, "
            f"{p['operator_time_per_token_us']:.0f} us/token in operators; {top}")
