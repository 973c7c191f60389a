"""Benchmark generation strategies side by side on the same examples, in one process.

    python benchmark.py --dataset human_eval --num_samples 20 --max_steps 128 --sample False \
        --generation_strategy autoregressive,self_speculative,hf_generate,hf_assistant_early_exit

Every strategy runs on every example in turn (after a warm-up), so they share the machine's conditions. Prints a
table with each strategy's speed and its speedup over hf_generate; writes benchmark_<time>.json (arguments,
effective settings, metrics) and benchmark_<time>.jsonl (a record per example and strategy, as they complete).
"""

import dataclasses
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from arguments import (MAX_WARMUP, SAMPLING, DatasetBatchArguments, DataArguments, GenerationArguments, ModelArguments,
                       parse, pop_list, pop_variants, run, warn_ignored, warn_unused)
from self_speculation import UsageError
from self_speculation.errors import check_range
from self_speculation.benchmarking import (RUNNER_FLAGS, RUNNERS, cost_meter, decoded_context, profile, record,
                                           variant_runners)
from self_speculation.reporting import compare, report
from self_speculation.generator import check_prompt_lengths
from self_speculation import distributed
from self_speculation.results import append_jsonl, ensure_output_dir, new_run, write_json


@dataclass
class BenchmarkArguments:
    warmup: int = field(default=1, metadata={"help": f"untimed runs of each strategy before measuring (0 to "
                                                     f"{MAX_WARMUP})"})

    profile: bool = field(default=False, metadata={
        "help": "after the timed runs, profile each strategy on the first example (torch.profiler) and print "
                "operators per token and the costliest operators"})

    def __post_init__(self):
        check_range("--warmup", self.warmup, 0, MAX_WARMUP)


ARGUMENTS = (ModelArguments, GenerationArguments, DataArguments, DatasetBatchArguments, BenchmarkArguments)
HELP = {"--generation_strategy": f"strategies to compare, comma-separated (or the flag given again), from: "
                                 f"{', '.join(RUNNERS)}. Every strategy gets the same flags and reads its own: "
                                 "autoregressive here is always the full model (the baseline; early_exit is early "
                                 "exit), and a flag no strategy reads is warned of",
        "--compile": ("run the decoding passes through torch.compile (True/False), or both: every strategy eager "
                      "and compiled, interleaved batch by batch, as rows NAME and NAME+compiled", "{True,False,both}"),
        "--draft_policy": ("how many tokens each self_speculative step drafts: static or adaptive, or several "
                           "comma-separated (static,adaptive): self_speculative under each, interleaved batch by batch, "
                           "as rows NAME+POLICY", "{static,adaptive}")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    strategies = pop_list(argv, "--generation_strategy", "autoregressive")
    unknown = [s for s in strategies if s not in RUNNERS]
    if unknown:
        raise UsageError(f"--generation_strategy: unknown {', '.join(unknown)} (choose from {', '.join(RUNNERS)})")
    variants = pop_variants(argv)
    model_args, config, data_args, batching, args = parse(ARGUMENTS, argv, help=HELP, doc=__doc__)
    if not config.sample and distributed.rank() == 0:
        warn_ignored(argv, SAMPLING, "greedy decoding (--sample False)")
    if distributed.rank() == 0:
        warn_unused(argv, {name: RUNNER_FLAGS[name] for name in strategies}, batching.batch_size)
    out = ensure_output_dir(model_args.output_dir)
    examples = data_args.load(model_args.seed)
    distributed.setup()
    model, tokenizer = model_args.load()
    runners, eager_only = variant_runners(strategies, variants, model, tokenizer, config, model_args.seed)
    for name in eager_only:
        print(f"warning: {name} has no compiled variant (--compile changes nothing in it); it runs eager only",
              file=sys.stderr)
    meters = {variant: meter for variant in {r.baseline for r in runners.values()}
              if (meter := cost_meter(runners, variant)) is not None}
    prompts = [tokenizer(e.prompt).input_ids for e in examples]
    check_prompt_lengths(model, prompts)
    batches = batching.batches(prompts)
    for runner in runners.values():
        runner.warm_up(batches, args.warmup)
    for meter in meters.values():  # compiles what the timed runs will run, and warms it up
        meter.measure(len(batches[0].prompts), max(len(p) for p in batches[0].prompts))
        meter.times.clear()
    stem = new_run(out, "benchmark")
    progress = tqdm(total=len(distributed.shard(batches)), desc="batches" if batching.batch_size > 1 else "examples",
                    disable=distributed.rank() != 0)

    def every_strategy(index, batch):  # in turn on each batch, so that they share the machine's conditions
        samples = [dataclasses.replace(sample, strategy=name) for name, runner in runners.items()
                   for sample in runner.run_batch(batch, index)]
        for meter in meters.values():  # and the passes timed alone beside them, at this batch's size and context
            meter.measure(len(batch.prompts), decoded_context(prompts, samples))
        progress.update()
        return samples

    def write(samples):
        for sample in samples:
            append_jsonl(stem.with_suffix(".jsonl"), {"run_id": stem.name} | record(sample, tokenizer))

    per_batch = distributed.map_shards(batches, every_strategy, write)
    progress.close()
    distributed.teardown()
    if per_batch is None:
        return 0
    metrics = compare(model, tokenizer, config, runners, [s for samples in per_batch for s in samples], prompts,
                      [e.reference for e in examples], {variant: meter.costs() for variant, meter in meters.items()})
    profiles = {name: profile(runner, prompts[0]) for name, runner in runners.items()} if args.profile else {}
    print(report(metrics, profiles, runners))
    write_json(stem.with_suffix(".json"), {
        "run_id": stem.name,
        "arguments": {"model": dataclasses.asdict(model_args), "generation": dataclasses.asdict(config),
                      "data": dataclasses.asdict(data_args), "strategies": strategies,
                      "variants": [r.variant for r in runners.values() if r.variant] or None,
                      "benchmark": dataclasses.asdict(args) | batching.settings()},
        "settings": {name: r.settings for name, r in runners.items()},
        "metrics": metrics,
    } | ({"profile": profiles} if profiles else {}),
        kept=f"the table above is complete, and every record is in {stem.with_suffix('.jsonl')}")
    print(f"results in {stem.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
