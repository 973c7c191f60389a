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
import time
from dataclasses import dataclass, field

from arguments import DataArguments, GenerationArguments, ModelArguments, parse, run
from self_speculation import Generator, UsageError
from self_speculation import distributed
from self_speculation.equivalence import TIE_TOLERANCE, compare, verifier_logits
from self_speculation.generator import check_prompt_lengths
from self_speculation.results import append_jsonl, ensure_output_dir, write_json
from self_speculation.strategies import Autoregressive, SelfSpeculative


@dataclass
class CorrectnessArguments:
    tie_tolerance: float = field(
        default=TIE_TOLERANCE,
        metadata={"help": "a mismatch is a near tie when the logit margins at its first differing token are within "
                          "this many eps(dtype) x |logit| (eps: 2^-7 bfloat16, 2^-10 float16, 2^-23 float32)"})
    strict: bool = field(default=False, metadata={"help": "fail on any mismatch, near ties included"})

    def __post_init__(self):
        if not self.tie_tolerance >= 0:
            raise UsageError(f"--tie_tolerance must be >= 0 (got {self.tie_tolerance})")


def main(argv: list[str] | None = None) -> int:
    model_args, config, data_args, args = parse((ModelArguments, GenerationArguments, DataArguments, CorrectnessArguments), argv)
    # Greedy on both sides: the invariant is token-for-token identity.
    speculative = SelfSpeculative().own(dataclasses.replace(config, sample=False))
    baseline = Autoregressive().own(dataclasses.replace(config, sample=False))
    output_dir = ensure_output_dir(model_args.output_dir)
    examples = data_args.load(model_args.seed)
    distributed.setup()
    model, tokenizer = model_args.load()
    prompts = [tokenizer(example.prompt).input_ids for example in examples]
    check_prompt_lengths(model, prompts)
    generators = {
        "autoregressive": Generator(model, tokenizer, baseline, seed=model_args.seed),
        "self_speculative": Generator(model, tokenizer, speculative, seed=model_args.seed),
    }
    stem = output_dir / f"correctness_{time.strftime('%Y%m%d_%H%M%S')}"
    records_path = stem.with_suffix(".jsonl")
    records = []  # this process's share; rank 0 writes its own as they complete, the others' when gathered
    for index, prompt in distributed.shard(prompts):
        outputs = {name: generator.generate_ids(prompt) for name, generator in generators.items()}
        ar, sp = outputs["autoregressive"], outputs["self_speculative"]
        verifier = verifier_logits(generators["self_speculative"], prompt) if ar.tokens != sp.tokens else None
        verdict = compare(model, prompt, ar.tokens, sp.tokens, verifier, args.tie_tolerance)
        record = {
            "prompt_id": index,
            "status": verdict.status,
            "match": verdict.status == "match",
            "first_mismatch": None if verdict.status == "match" else verdict.common_prefix,
            "comparison": verdict.as_dict(),
            "acceptance_rate": sp.acceptance_rate,
            "autoregressive": {"tokens": ar.tokens, "text": tokenizer.decode(ar.tokens, skip_special_tokens=True)},
            "self_speculative": {"tokens": sp.tokens, "text": tokenizer.decode(sp.tokens, skip_special_tokens=True)},
        }
        records.append(record)
        if distributed.rank() == 0:
            append_jsonl(records_path, record)
            print(f"prompt {index}: {verdict.describe()} ({len(ar.tokens)} tokens)", flush=True)
    records = distributed.gather(records)
    distributed.teardown()
    if records is None:
        return 0
    for record in records:
        if record["prompt_id"] % distributed.world_size() != 0:
            append_jsonl(records_path, record)
    records.sort(key=lambda r: r["prompt_id"])
    by_status = {s: [r["prompt_id"] for r in records if r["status"] == s] for s in ("match", "near_tie", "divergence")}
    tie_margins = [r["comparison"]["largest_margin"] for r in records if r["status"] == "near_tie"]
    mismatches = by_status["near_tie"] + by_status["divergence"]
    write_json(
        stem.with_suffix(".json"),
        {
            "arguments": {"model": dataclasses.asdict(model_args), "generation": dataclasses.asdict(speculative),
                          "data": dataclasses.asdict(data_args), "correctness": dataclasses.asdict(args)},
            "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
            "num_prompts": len(records),
            "num_matches": len(by_status["match"]),
            "num_near_ties": len(by_status["near_tie"]),
            "num_divergences": len(by_status["divergence"]),
            "num_mismatches": len(mismatches),
            "mismatched_prompt_ids": sorted(mismatches),
            "near_tie_prompt_ids": by_status["near_tie"],
            "divergent_prompt_ids": by_status["divergence"],
            "largest_tie_margin": max(tie_margins, default=None),
            "results": records,
        },
    )
    largest = f" (largest margin {max(tie_margins):.4g})" if tie_margins else ""
    print(f"{len(mismatches)} of {len(records)} outputs differ: {len(by_status['near_tie'])} near ties{largest}, "
          f"{len(by_status['divergence'])} divergences; results in {stem.with_suffix('.json')}")
    failed = by_status["divergence"] or (args.strict and mismatches)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(main))
