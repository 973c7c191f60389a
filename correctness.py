"""Check that greedy self-speculative decoding reproduces greedy autoregressive decoding token for token.

    python correctness.py --dataset human_eval --num_samples 20 --max_steps 128
    python correctness.py --model DIR --dataset custom_jsonl --data_path prompts.jsonl --exit_layer 8 --num_speculations 6

Writes correctness_<time>.json (and a .jsonl record per prompt as it completes) to --output_dir; exits 1 if any
output differs.
"""

import dataclasses
import sys
import time

from arguments import DataArguments, GenerationConfig, ModelArguments, parse, run
from self_speculation import Generator
from self_speculation import distributed
from self_speculation.generator import check_prompt_lengths
from self_speculation.results import append_jsonl, ensure_output_dir, write_json


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv: list[str] | None = None) -> int:
    model_args, config, args = parse((ModelArguments, GenerationConfig, DataArguments), argv)
    # Greedy on both sides: the invariant is token-for-token identity.
    speculative = dataclasses.replace(config, generation_strategy="self_speculative", sample=False)
    baseline = dataclasses.replace(config, generation_strategy="autoregressive", sample=False, exit_layer=-1)
    output_dir = ensure_output_dir(model_args.output_dir)
    prompts = [example.prompt for example in args.load(model_args.seed)]
    distributed.setup()
    model, tokenizer = model_args.load()
    check_prompt_lengths(model, [tokenizer(prompt).input_ids for prompt in prompts])
    generators = {
        "autoregressive": Generator(model, tokenizer, baseline, seed=model_args.seed),
        "self_speculative": Generator(model, tokenizer, speculative, seed=model_args.seed),
    }
    stem = output_dir / f"correctness_{time.strftime('%Y%m%d_%H%M%S')}"
    records_path = stem.with_suffix(".jsonl")
    records = []  # this process's share; rank 0 writes its own as they complete, the others' when gathered
    for index, prompt in distributed.shard(prompts):
        outputs = {name: generator.generate(prompt) for name, generator in generators.items()}
        ar, sp = outputs["autoregressive"], outputs["self_speculative"]
        mismatch = first_difference(ar.tokens, sp.tokens)
        record = {
            "prompt_id": index,
            "match": mismatch is None,
            "first_mismatch": mismatch,
            "acceptance_rate": sp.acceptance_rate,
            "autoregressive": {"tokens": ar.tokens, "text": ar.text},
            "self_speculative": {"tokens": sp.tokens, "text": sp.text},
        }
        records.append(record)
        if distributed.rank() == 0:
            append_jsonl(records_path, record)
            status = "ok" if mismatch is None else f"MISMATCH at token {mismatch}"
            print(f"prompt {index}: {status} ({len(ar.tokens)} tokens)", flush=True)
    records = distributed.gather(records)
    distributed.teardown()
    if records is None:
        return 0
    for record in records:
        if record["prompt_id"] % distributed.world_size() != 0:
            append_jsonl(records_path, record)
    records.sort(key=lambda r: r["prompt_id"])
    mismatches = [r["prompt_id"] for r in records if not r["match"]]
    write_json(
        stem.with_suffix(".json"),
        {
            "arguments": {"model": dataclasses.asdict(model_args), "generation": dataclasses.asdict(speculative),
                          "data": dataclasses.asdict(args)},
            "num_prompts": len(records),
            "num_mismatches": len(mismatches),
            "mismatched_prompt_ids": mismatches,
            "results": records,
        },
    )
    print(f"{len(mismatches)} of {len(records)} outputs differ; results in {stem.with_suffix('.json')}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(run(main))
