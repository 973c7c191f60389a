"""Benchmark generation strategies side by side on the same examples, in one process.

    python benchmark.py --dataset human_eval --num_samples 20 --max_steps 128 --sample False \
        --generation_strategy autoregressive,self_speculative,hf_generate,hf_assistant_early_exit

Every strategy runs on every example in turn (after a warm-up), so they share the machine's conditions. Prints a
table with each strategy's speed and its speedup over hf_generate; writes benchmark_<time>.json (arguments,
effective settings, metrics) and benchmark_<time>.jsonl (a record per example and strategy, as they complete).
"""

import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from arguments import DataArguments, GenerationArguments, ModelArguments, parse, pop_option, run
from self_speculation import UsageError
from self_speculation.benchmarking import RUNNERS, profile, speculation_report, summarize
from self_speculation.equivalence import tally
from self_speculation.generator import check_prompt_lengths
from self_speculation.metrics import quality
from self_speculation import distributed
from self_speculation.results import append_jsonl, ensure_output_dir, write_json


@dataclass
class BenchmarkArguments:
    warmup: int = field(default=1, metadata={"help": "untimed runs of each strategy before measuring"})
    profile: bool = field(default=False, metadata={
        "help": "after the timed runs, profile each strategy on the first example (torch.profiler) and print "
                "operators per token and the costliest operators"})

    def __post_init__(self):
        if self.warmup < 0:
            raise UsageError(f"--warmup must be >= 0 (got {self.warmup})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    strategies = pop_option(argv, "--generation_strategy", "autoregressive").split(",")
    unknown = [s for s in strategies if s not in RUNNERS]
    if unknown:
        raise UsageError(f"--generation_strategy: unknown {', '.join(unknown)} (choose from {', '.join(RUNNERS)})")
    model_args, config, data_args, args = parse(
        (ModelArguments, GenerationArguments, DataArguments, BenchmarkArguments), argv,
        help={"--generation_strategy": f"strategies to compare, comma-separated, from: {', '.join(RUNNERS)}"})
    out = ensure_output_dir(model_args.output_dir)
    examples = data_args.load(model_args.seed)
    distributed.setup()
    model, tokenizer = model_args.load()
    runners = {name: RUNNERS[name](model, tokenizer, config, model_args.seed) for name in strategies}
    prompts = [tokenizer(e.prompt).input_ids for e in examples]
    check_prompt_lengths(model, prompts)
    for _ in range(args.warmup):
        for runner in runners.values():
            runner.run(prompts[0])
    stem = out / f"benchmark_{time.strftime('%Y%m%d_%H%M%S')}"
    local = []  # this process's share; rank 0 writes its own records as they complete, the others' when gathered
    shard = distributed.shard(prompts)
    for prompt_id, prompt in tqdm(shard, desc="examples", unit="example", disable=distributed.rank() != 0):
        for name, runner in runners.items():
            sample = dataclasses.replace(runner.run(prompt), strategy=name, prompt_id=prompt_id)
            local.append(sample)
            if distributed.rank() == 0:
                append_jsonl(stem.with_suffix(".jsonl"), record(sample, tokenizer))
    gathered = distributed.gather(local)
    distributed.teardown()
    if gathered is None:
        return 0
    for sample in gathered:
        if sample.prompt_id % distributed.world_size() != 0:
            append_jsonl(stem.with_suffix(".jsonl"), record(sample, tokenizer))
    samples = {name: sorted((s for s in gathered if s.strategy == name), key=lambda s: s.prompt_id) for name in runners}
    metrics = {}
    for name, strategy_samples in samples.items():
        outputs = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in strategy_samples]
        metrics[name] = summarize(strategy_samples) | quality(outputs, [e.reference for e in examples])
    baseline = metrics.get("hf_generate")
    for name, m in metrics.items():
        if baseline:
            m["speedup_vs_hf_generate"] = m["tokens_per_second_median"] / baseline["tokens_per_second_median"]
            if not config.sample:  # near ties: rounding flips where the two best logits are closer than it
                counts = tally(model, prompts, [s.tokens for s in samples["hf_generate"]],
                               [s.tokens for s in samples[name]])
                m["outputs_differing_from_hf_generate"] = counts["differing"]
                m["near_ties_vs_hf_generate"] = counts["near_ties"]
                m["divergences_vs_hf_generate"] = counts["divergences"]
    if "self_speculative" in metrics:
        context = int(statistics.median(len(p) for p in prompts)) + config.max_steps // 2
        metrics["self_speculative"] |= speculation_report(
            model, metrics, samples["self_speculative"], runners["self_speculative"].settings, context)
    profiles = {name: profile(runner, prompts[0]) for name, runner in runners.items()} if args.profile else {}
    write_json(stem.with_suffix(".json"), {
        "arguments": {"model": dataclasses.asdict(model_args), "generation": dataclasses.asdict(config),
                      "data": dataclasses.asdict(data_args), "benchmark": dataclasses.asdict(args), "strategies": strategies},
        "settings": {name: r.settings for name, r in runners.items()},
        "metrics": metrics,
    } | ({"profile": profiles} if profiles else {}))
    print(format_table(metrics))
    if "self_speculative" in metrics:
        print(format_speculation(metrics["self_speculative"]))
    for name, p in profiles.items():
        print(format_profile(name, p))
    print(f"results in {stem.with_suffix('.json')}")
    return 0


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


if __name__ == "__main__":
    sys.exit(run(main))
