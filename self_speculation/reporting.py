"""A benchmark's results: each strategy's speed and quality metrics, the comparison with hf_generate, and the
printed report. A strategy of the table adds its own metrics and lines through its hooks (`Strategy.metrics`,
`Strategy.report_lines`)."""

import statistics

from .benchmarking import Runner, Sample
from .config import GenerationConfig
from .equivalence import tally
from .metrics import quality
from .strategies import Autoregressive


def by_batch(samples: list[Sample]) -> list[list[Sample]]:
    """Samples grouped by the batch they were generated in (a sample alone is a batch of its own)."""
    groups: dict[int, list[Sample]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.batch if s.batch >= 0 else -1 - i, []).append(s)
    return list(groups.values())


def summarize(samples: list[Sample]) -> dict:
    """Speed metrics of one strategy over its samples: medians over batches (a sample alone is a batch of one;
    a batch's throughput is the tokens of all its rows over its wall time), totals over all of them. The headline
    `tokens_per_second`, which every speedup compares: one prompt at a time, the median over prompts (robust to
    the machine's slow moments); in batches, all tokens over all the time, since a median over a few batches
    swings with one of them (measured: 0.97x by the median where the totals gave 1.04x, 0.76x against 1.05x)."""
    tokens = sum(len(s.tokens) for s in samples)
    batches = by_batch(samples)
    times = [(sum(len(s.tokens) for s in rows), rows[0].total_time) for rows in batches]
    total_time = sum(t for _, t in times)
    drafted = sum(s.drafted for s in samples)
    passes = sum(s.passes for s in samples)
    first = [s.time_to_first_token for s in samples if s.time_to_first_token is not None]
    rows_per_batch = max(len(rows) for rows in batches)
    median = statistics.median(n / t if t > 0 else 0.0 for n, t in times)
    overall = tokens / total_time if total_time else 0.0
    return {
        "samples": len(samples),
        "rows_per_batch": rows_per_batch,
        "tokens": tokens,
        "tokens_per_second": overall if rows_per_batch > 1 else median,
        "tokens_per_second_median": median,
        "tokens_per_second_overall": overall,
        "time_per_token_median": statistics.median(t / max(n, 1) for n, t in times),
        "total_time": total_time,
        "time_to_first_token_median": statistics.median(first) if first else None,
        "acceptance_rate": sum(s.accepted for s in samples) / drafted if drafted else None,
        "tokens_per_full_model_pass": tokens / passes if passes else None,
        "kv_cache_bytes_max": max((s.cache_bytes for s in samples if s.cache_bytes is not None), default=None),
        "peak_gpu_bytes_max": max((s.peak_gpu_bytes for s in samples if s.peak_gpu_bytes is not None), default=None),
    }


def compare(model, tokenizer, config: GenerationConfig, runners: dict[str, Runner], samples: list[Sample],
            prompts: list[list[int]], references: list[str], costs: dict | None = None) -> dict:
    """The metrics of every strategy: speed, quality against the references, speedup over hf_generate and, when
    greedy, its outputs against hf_generate's (near ties and divergences apart), a compiled row against compiled
    hf_generate; a compiled variant's speedup
    over its eager one; and what each of our strategies adds (`Strategy.metrics`, with the pass costs timed
    beside the run for its variant: `costs`, variant -> PassCosts)."""
    by_strategy = {name: sorted((s for s in samples if s.strategy == name), key=lambda s: s.prompt_id)
                   for name in runners}
    metrics = {}
    for name, strategy_samples in by_strategy.items():
        outputs = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in strategy_samples]
        metrics[name] = summarize(strategy_samples) | quality(outputs, references)
        if runners[name].alone is not None:
            metrics[name]["one_at_a_time"] = runners[name].alone
    for name, m in metrics.items():
        hf = "hf_generate" + runners[name].baseline  # a compiled row meets compiled hf_generate
        if hf in metrics:
            m["speedup_vs_hf_generate"] = m["tokens_per_second"] / metrics[hf]["tokens_per_second"]
            if not config.sample:  # near ties: rounding flips where the two best logits are closer than it
                counts = tally(model, prompts, [s.tokens for s in by_strategy[hf]],
                               [s.tokens for s in by_strategy[name]])
                m["outputs_differing_from_hf_generate"] = counts["differing"]
                m["near_ties_vs_hf_generate"] = counts["near_ties"]
                m["divergences_vs_hf_generate"] = counts["divergences"]
    for name, runner in runners.items():
        for label, (_, sibling) in runner.siblings.items():  # a variant over the row it varies, within this run
            if sibling in metrics:
                metrics[name][f"speedup_vs_{label}"] = (metrics[name]["tokens_per_second"]
                                                        / metrics[sibling]["tokens_per_second"])
        if runner.generator is not None:
            plain = metrics.get(Autoregressive.name + runner.baseline)
            metrics[name] |= runner.generator.strategy.metrics(metrics[name], plain, by_batch(by_strategy[name]),
                                                     (costs or {}).get(runner.baseline))
    return metrics


def report(metrics: dict, profiles: dict, runners: dict[str, Runner]) -> str:
    """What benchmark.py prints: the table, the compile speedups, each of our strategies' lines, the profiles."""
    lines = [format_table(metrics)]
    if any(m["rows_per_batch"] > 1 for m in metrics.values()):
        lines += [f"{name}: one prompt at a time ({m['one_at_a_time']}); its figures are batch-1 figures"
                  for name, m in metrics.items() if "one_at_a_time" in m]
    ratios: dict[str, list[str]] = {}  # "compiled over eager" -> each row's ratio over the row it varies
    for name, runner in runners.items():
        for label, (part, _) in runner.siblings.items():
            if f"speedup_vs_{label}" in metrics[name]:
                ratios.setdefault(f"{part} over {label}", []).append(
                    f"{name.replace('+' + part, '', 1)} {metrics[name][f'speedup_vs_{label}']:.2f}x")
    lines += [f"{pair}, interleaved in this run: {', '.join(rows)}" for pair, rows in ratios.items()]
    lines += [line for name, m in metrics.items() if runners[name].generator is not None
              for line in runners[name].generator.strategy.report_lines(name, m)]
    lines += [format_profile(name, p) for name, p in profiles.items()]
    return "\n".join(lines)


def format_table(metrics: dict) -> str:
    def cell(value, fmt, unit=""):
        return "-" if value is None else format(value, fmt) + unit

    batched = any(m["rows_per_batch"] > 1 for m in metrics.values())
    headline = "tokens/s (all tokens / all time) | tokens/s (median batch)" if batched else "tokens/s (median)"
    lines = [f"| strategy | {headline} | ms/token | acceptance | tokens/full pass | speedup vs hf_generate | "
             "outputs ≠ hf (near ties, divergences) |",
             "|---|---|---|---|---|---|---|" + ("---|" if batched else "")]
    for name, m in metrics.items():
        acceptance = None if m["acceptance_rate"] is None else 100 * m["acceptance_rate"]
        speed = f"{m['tokens_per_second']:.1f}" + (f" | {m['tokens_per_second_median']:.1f}" if batched else "")
        lines.append(f"| {name} | {speed} | {1000 * m['time_per_token_median']:.2f} | "
                     f"{cell(acceptance, '.1f', '%')} | {cell(m['tokens_per_full_model_pass'], '.2f')} | "
                     f"{cell(m.get('speedup_vs_hf_generate'), '.2f', 'x')} | {differing(m)} |")
    return "\n".join(lines)


def differing(m: dict) -> str:
    if "outputs_differing_from_hf_generate" not in m:
        return "-"
    count = m["outputs_differing_from_hf_generate"]
    return f"{count} ({m['near_ties_vs_hf_generate']}, {m['divergences_vs_hf_generate']})" if count else "0"


def format_profile(name: str, p: dict) -> str:
    top = ", ".join(f"{t['operator'].removeprefix('aten::')} {100 * t['share']:.0f}%" for t in p["top"][:5])
    return (f"profile {name}: {p['operators_per_token']:.0f} operators/token, "
            f"{p['operator_time_per_token_us']:.0f} us/token in operators; {top}")
