"""Check that greedy self-speculative decoding reproduces greedy autoregressive decoding token for token.

    python correctness.py --dataset human_eval --num_samples 20 --max_steps 128
    python correctness.py --model DIR --dataset custom_jsonl --data_path prompts.jsonl --exit_layer 8 --num_speculations 6
    python correctness.py --dtype bfloat16 --num_samples 10        # half precision: mismatches are classified

Every output is a match, a near tie or a divergence (self_speculation/equivalence.py): at the first differing
token, the margin between the two candidates' logits, under the full model run on the common prefix and under the
verifier's logits, is compared with the rounding error of the dtype (--tie_tolerance). Float32 gives matches only;
half precision may give near ties. Writes correctness_<time>.json (and a .jsonl record per prompt as it
completes) to --output_dir; exits 1 on any divergence (on any mismatch with --strict True).
"""

import dataclasses
import sys
from dataclasses import dataclass, field

from arguments import (SAMPLING, DatasetBatchArguments, DataArguments, GenerationArguments, ModelArguments, parse, run,
                       warn_ignored, warn_unused)
from self_speculation import Generator
from self_speculation.errors import check_range
from self_speculation import distributed
from self_speculation.equivalence import TIE_TOLERANCE, judge, summary
from self_speculation.generator import check_prompt_lengths
from self_speculation.results import append_jsonl, ensure_output_dir, new_run, write_json
from self_speculation.strategies import Autoregressive, SelfSpeculative


@dataclass
class CorrectnessArguments:
    tie_tolerance: float = field(
        default=TIE_TOLERANCE,
        metadata={"help": "a mismatch is a near tie when the logit margins at its first differing token are within "
                          "this many eps(dtype) x |logit| (eps: 2^-7 bfloat16, 2^-10 float16, 2^-23 float32)"})
    strict: bool = field(default=False, metadata={"help": "fail on any mismatch, near ties included"})

    def __post_init__(self):
        check_range("--tie_tolerance", self.tie_tolerance, 0)


ARGUMENTS = (ModelArguments, GenerationArguments, DataArguments, DatasetBatchArguments, CorrectnessArguments)
GREEDY_ONLY = "not used: both sides decode greedily (default: greedy)"
UNUSED_HELP = {"--generation_strategy": ("not used: self_speculative is always compared with autoregressive (default: both)", None),
               **{f"--{name}": (GREEDY_ONLY, None) for name in ("sample",) + SAMPLING}}


def main(argv: list[str] | None = None) -> int:
    model_args, config, data_args, batching, args = parse(ARGUMENTS, argv, doc=__doc__, help=UNUSED_HELP)
    # Greedy on both sides: the invariant is token-for-token identity.
    if distributed.rank() == 0:
        warn_ignored(argv, ("generation_strategy", "sample") + SAMPLING,
                     "correctness.py compares greedy self_speculative with greedy autoregressive decoding")
        warn_unused(argv, {s.name: s.flags for s in (Autoregressive, SelfSpeculative)}, batching.batch_size)
    speculative = SelfSpeculative().own(dataclasses.replace(config, sample=False))
    baseline = Autoregressive().own(dataclasses.replace(config, sample=False))
    output_dir = ensure_output_dir(model_args.output_dir)
    examples = data_args.load(model_args.seed)
    distributed.setup()
    model, tokenizer = model_args.load()
    prompts = [tokenizer(example.prompt).input_ids for example in examples]
    check_prompt_lengths(model, prompts)
    reference = Generator(model, tokenizer, baseline, seed=model_args.seed)
    candidate = Generator(model, tokenizer, speculative, seed=model_args.seed)
    stem = new_run(output_dir, "correctness")

    def check(index, batch):
        return judge(model, tokenizer, reference, candidate, batch.ids, batch.prompts, args.tie_tolerance)

    def write(batch_records):
        for record in batch_records:
            append_jsonl(stem.with_suffix(".jsonl"), {"run_id": stem.name} | record)
            print(f"prompt {record['prompt_id']}: {record['verdict']}", flush=True)

    per_batch = distributed.map_shards(batching.batches(prompts), check, write)
    distributed.teardown()
    if per_batch is None:
        return 0
    records = sorted((record for batch_records in per_batch for record in batch_records), key=lambda r: r["prompt_id"])
    totals = summary(records)
    write_json(stem.with_suffix(".json"), {
        "run_id": stem.name,
        "arguments": {"model": dataclasses.asdict(model_args), "generation": dataclasses.asdict(candidate.config),
                      "data": dataclasses.asdict(data_args),
                      "correctness": dataclasses.asdict(args) | batching.settings()},
        "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
    } | totals | {"results": records}, kept=f"{totals['verdict']}; every record is in {stem.with_suffix('.jsonl')}")
    print(f"{totals['verdict']}; results in {stem.with_suffix('.json')}")
    return 1 if totals["num_divergences"] or (args.strict and totals["num_mismatches"]) else 0


if __name__ == "__main__":
    sys.exit(run(main))
