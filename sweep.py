"""Sweep exit_layer × num_speculations for self-speculative decoding on the same examples.

    python sweep.py --dataset human_eval --num_samples 10 --max_steps 128 --sample False \
        --exit_layer_first 1 --exit_layer_last 12 --num_speculations_first 1 --num_speculations_last 8

The grid's points draft a fixed length (the static draft policy). With --draft_policy static,adaptive the adaptive
policy is measured too, once per exit layer (it chooses its lengths; its first step drafts
--num_speculations_first), beside the grid.

Each point is a benchmark of every example, with our autoregressive decoding timed batch by batch in turn with it
(its speedup is a ratio within the point, which this machine's drift between points does not enter; the best point
is chosen by it); sweep.csv gets a row as each point finishes. Running the same command again resumes: finished
points are skipped. At the end: a summary table, the best point, and contour plots of tokens/s, the speedup and
acceptance (PNG and PDF). The baseline for outputs (Hugging Face generate) is measured once, first.
"""

import dataclasses
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from arguments import (MAX_WARMUP, SAMPLING, DatasetBatchArguments, DataArguments, GenerationArguments,
                       ModelArguments, parse, pop_policies, run, warn_ignored)
from self_speculation import UsageError, distributed
from self_speculation.errors import check_range
from self_speculation.benchmarking import RUNNERS
from self_speculation.generator import check_prompt_lengths
from self_speculation.results import ensure_output_dir
from self_speculation.sweeping import Point, SweepDirectory, run_in_turn

MAX_POINTS = 10_000  # each point benchmarks every example: more is a mistyped bound, not a sweep


@dataclass
class SweepArguments:
    exit_layer_first: int = field(default=1, metadata={"help": "first exit layer"})
    exit_layer_last: int = field(default=15, metadata={"help": "last exit layer (clipped to the model's layers - 1)"})
    exit_layer_step: int = field(default=1, metadata={"help": "exit layer step"})
    num_speculations_first: int = field(default=1, metadata={"help": "first draft length"})
    num_speculations_last: int = field(default=6, metadata={"help": "last draft length"})
    num_speculations_step: int = field(default=1, metadata={"help": "draft length step"})
    warmup: int = field(default=1, metadata={"help": "untimed runs before measuring"})
    autoregressive_each_point: bool = field(default=True, metadata={
        "help": "at every point, also time our autoregressive decoding, batch by batch in turn with the point, for "
                "a speedup within the point (the best point is chosen by it: a machine's speed drifts between "
                "points); False halves a sweep's time"})

    def __post_init__(self):
        for name in ("exit_layer", "num_speculations"):
            first, last, step = (getattr(self, f"{name}_{end}") for end in ("first", "last", "step"))
            check_range(f"--{name}_first", first, 1)
            check_range(f"--{name}_step", step, 1)
            if last < first:
                raise UsageError(f"--{name}_last ({last}) must be >= --{name}_first ({first})")
        drafts = (self.num_speculations_last - self.num_speculations_first) // self.num_speculations_step + 1
        if drafts > MAX_POINTS:  # counted without a range, whose len() overflows past 2**63
            raise UsageError(f"--num_speculations_last {self.num_speculations_last}: {drafts} draft lengths, more "
                             f"than the {MAX_POINTS} points a sweep may have (raise --num_speculations_step)")
        check_range("--warmup", self.warmup, 0, MAX_WARMUP)


# the sweep sets them at every point
IGNORED = ("generation_strategy", "exit_layer", "num_speculations")
STATIC_ONLY = ("batch_drafts", "no_batch_drafts")  # read by the adaptive policy's points alone
HELP = {"--draft_policy": ("static: the grid, every step drafting its point's length; adaptive: a point per exit "
                           "layer, the policy choosing its lengths; static,adaptive: both (default: static)",
                           "{static,adaptive}")}


ARGUMENTS = (ModelArguments, GenerationArguments, DataArguments, DatasetBatchArguments, SweepArguments)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    policies = pop_policies(argv)
    model_args, config, data_args, batching, args = parse(ARGUMENTS, argv, help=HELP, doc=__doc__)
    out = ensure_output_dir(model_args.output_dir)
    generation = dataclasses.asdict(config) | {"draft_policy": ",".join(policies)}
    directory = SweepDirectory(out, {"model": dataclasses.asdict(model_args), "generation": generation,
                                     "data": dataclasses.asdict(data_args),
                                     "sweep": dataclasses.asdict(args) | batching.settings()})
    examples = data_args.load(model_args.seed)
    distributed.setup()
    model, tokenizer = model_args.load()
    last_exit = min(args.exit_layer_last, model.config.num_hidden_layers - 1)
    if args.exit_layer_first > last_exit:
        raise UsageError(f"--exit_layer_first must be <= {last_exit} for this model")
    prompts = [tokenizer(e.prompt).input_ids for e in examples]
    check_prompt_lengths(model, prompts)
    exits = range(args.exit_layer_first, last_exit + 1, args.exit_layer_step)
    drafts = range(args.num_speculations_first, args.num_speculations_last + 1, args.num_speculations_step)
    if len(exits) * len(drafts) > MAX_POINTS:
        raise UsageError(f"{len(exits)} exit layers x {len(drafts)} draft lengths is more than the {MAX_POINTS} points "
                         "a sweep may have; raise --exit_layer_step or --num_speculations_step")
    points = [Point(e, d) for e in exits for d in drafts] if "static" in policies else []
    points += [Point(e, args.num_speculations_first, "adaptive") for e in exits] if "adaptive" in policies else []
    if distributed.rank() == 0:
        warn_ignored(argv, IGNORED, "a sweep runs self_speculative at every (exit layer, draft length) of its grid "
                                    "(--exit_layer_first/last/step, --num_speculations_first/last/step)")
        if "adaptive" not in policies:
            warn_ignored(argv, STATIC_ONLY, "the grid's points draft their own length in batches too")
        if "static" not in policies:
            warn_ignored(argv, ("num_speculations_last", "num_speculations_step"), "without the static grid, the "
                         "adaptive policy's points start at --num_speculations_first and choose their own lengths")
        if not config.sample:
            warn_ignored(argv, SAMPLING, "greedy decoding (--sample False)")
        if batching.batch_size == 1:
            warn_ignored(argv, ("group_by_length", "no_group_by_length"), "one prompt at a time (--batch_size 1)")
    done = directory.start()  # every flag is checked: from here on the directory holds this sweep
    batches = batching.batches(prompts)
    baseline = directory.baseline(model, tokenizer, config, model_args.seed, batches, args.warmup)
    todo = [p for p in points if p not in done]
    plain = []  # our autoregressive decoding, timed in turn with every point
    if args.autoregressive_each_point:
        plain.append(RUNNERS["autoregressive"](model, tokenizer, config, model_args.seed))
    for runner in plain:  # warmed up as the baseline was
        runner.warm_up(batches, args.warmup)
    for exit_layer, num_speculations, policy in tqdm(todo, desc="sweep", unit="point",
                                                    disable=distributed.rank() != 0):
        # a static point drafts exactly its num_speculations at every step and batch size: it measures the grid
        point = dataclasses.replace(config, exit_layer=exit_layer, num_speculations=num_speculations,
                                    draft_policy=policy, batch_drafts=config.batch_drafts and policy != "static")
        speculative = RUNNERS["self_speculative"](model, tokenizer, point, model_args.seed)
        speculative.warm_up(batches, args.warmup)  # with --compile, the point compiles here, not in its timed runs
        samples, *autoregressive = run_in_turn([speculative] + plain, batches)
        if samples is not None:  # rank 0 writes the row
            directory.write_point(model, point, samples, prompts, baseline, *autoregressive)
    distributed.teardown()
    if distributed.rank() == 0:
        print(directory.report(points, baseline, greedy=not config.sample))
        print(directory.plot(points))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
