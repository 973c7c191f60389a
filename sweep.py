"""Sweep exit_layer × num_speculations for self-speculative decoding on the same examples.

    python sweep.py --dataset human_eval --num_samples 10 --max_steps 128 --sample False \
        --exit_layer_first 1 --exit_layer_last 12 --num_speculations_first 1 --num_speculations_last 8

Each point is a benchmark of every example; sweep.csv gets a row as each point finishes. Running the same command
again resumes: finished points are skipped. At the end: a summary table, the best point, and contour plots of
tokens/s and acceptance (PNG and PDF). The baseline (Hugging Face generate) is measured once, first.
"""

import csv
import dataclasses
import io
import json
import sys
from dataclasses import dataclass, field

import pandas as pd
from tqdm import tqdm

from arguments import DataArguments, GenerationArguments, ModelArguments, parse, run
from self_speculation import UsageError
from self_speculation.benchmarking import RUNNERS, summarize
from self_speculation import distributed
from self_speculation.equivalence import tally
from self_speculation.generator import check_prompt_lengths
from self_speculation.plotting import sweep_plot
from self_speculation.results import ensure_output_dir, write_json

COLUMNS = ["exit_layer", "num_speculations", "tokens_per_second_median", "speedup_vs_baseline", "acceptance_rate",
           "tokens_per_full_model_pass", "time_per_token_median", "total_time", "outputs_differing_from_baseline",
           "near_ties", "divergences"]


@dataclass
class SweepArguments:
    exit_layer_first: int = field(default=1, metadata={"help": "first exit layer"})
    exit_layer_last: int = field(default=15, metadata={"help": "last exit layer (clipped to the model's layers - 1)"})
    exit_layer_step: int = field(default=1, metadata={"help": "exit layer step"})
    num_speculations_first: int = field(default=1, metadata={"help": "first draft length"})
    num_speculations_last: int = field(default=6, metadata={"help": "last draft length"})
    num_speculations_step: int = field(default=1, metadata={"help": "draft length step"})
    warmup: int = field(default=1, metadata={"help": "untimed runs before measuring"})

    def __post_init__(self):
        if self.exit_layer_first < 1 or self.num_speculations_first < 1:
            raise UsageError("--exit_layer_first and --num_speculations_first must be >= 1")
        if self.exit_layer_step < 1 or self.num_speculations_step < 1:
            raise UsageError("--exit_layer_step and --num_speculations_step must be >= 1")
        for name in ("exit_layer", "num_speculations"):
            first, last = getattr(self, f"{name}_first"), getattr(self, f"{name}_last")
            if last < first:
                raise UsageError(f"--{name}_last ({last}) must be >= --{name}_first ({first})")


def main(argv: list[str] | None = None) -> int:
    model_args, config, data_args, args = parse((ModelArguments, GenerationArguments, DataArguments, SweepArguments), argv)
    out = ensure_output_dir(model_args.output_dir)
    settings_path, csv_path = out / "sweep_config.json", out / "sweep.csv"
    # the directory's name is not a setting: a sweep moved elsewhere resumes there
    settings = {"model": dataclasses.asdict(model_args) | {"output_dir": None}, "generation": dataclasses.asdict(config),
                "data": dataclasses.asdict(data_args), "sweep": dataclasses.asdict(args)}
    if settings_path.exists() and not same_settings(json.loads(settings_path.read_text()), settings):
        raise UsageError(f"--output_dir {out} holds a sweep with other flags; use another directory to start anew")
    examples = data_args.load(model_args.seed)
    distributed.setup()
    model, tokenizer = model_args.load()
    last_exit = min(args.exit_layer_last, model.config.num_hidden_layers - 1)
    if args.exit_layer_first > last_exit:
        raise UsageError(f"--exit_layer_first must be <= {last_exit} for this model")
    prompts = [tokenizer(e.prompt).input_ids for e in examples]
    check_prompt_lengths(model, prompts)
    points = [(e, d) for e in range(args.exit_layer_first, last_exit + 1, args.exit_layer_step)
              for d in range(args.num_speculations_first, args.num_speculations_last + 1, args.num_speculations_step)]
    # every flag is checked: from here on the directory holds this sweep
    done = finished_points(csv_path, repair=distributed.rank() == 0) if csv_path.exists() else set()
    if distributed.rank() == 0:
        write_json(settings_path, settings)
        if not csv_path.exists():
            with csv_path.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
    baseline = measure_baseline(out, model, tokenizer, config, model_args.seed, prompts, args.warmup)
    todo = [p for p in points if p not in done]
    for exit_layer, num_speculations in tqdm(todo, desc="sweep", unit="point", disable=distributed.rank() != 0):
        point = dataclasses.replace(config, exit_layer=exit_layer, num_speculations=num_speculations)
        runner = RUNNERS["self_speculative"](model, tokenizer, point, model_args.seed)
        samples = run_shared(runner, prompts)
        if samples is None:
            continue  # not rank 0: rank 0 writes the row
        m = summarize(samples)
        # greedy: outputs differing from the baseline's, split into rounding near ties and divergences
        counts = {} if config.sample else tally(model, prompts, baseline["outputs"], [s.tokens for s in samples])
        row = [exit_layer, num_speculations, m["tokens_per_second_median"],
               m["tokens_per_second_median"] / baseline["tokens_per_second_median"], m["acceptance_rate"],
               m["tokens_per_full_model_pass"], m["time_per_token_median"], m["total_time"],
               counts.get("differing"), counts.get("near_ties"), counts.get("divergences")]
        with csv_path.open("a", newline="") as f:
            csv.writer(f).writerow(row)
    distributed.teardown()
    if distributed.rank() != 0:
        return 0
    frame = pd.read_csv(csv_path)
    frame = frame[frame.apply(lambda r: (int(r["exit_layer"]), int(r["num_speculations"])) in set(points), axis=1)]
    best = frame.loc[frame["tokens_per_second_median"].idxmax()]
    print(frame.sort_values(["exit_layer", "num_speculations"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"baseline hf_generate: {baseline['tokens_per_second_median']:.1f} tokens/s; best: exit_layer "
          f"{int(best['exit_layer'])}, num_speculations {int(best['num_speculations'])}: "
          f"{best['tokens_per_second_median']:.1f} tokens/s ({best['speedup_vs_baseline']:.2f}x), "
          f"acceptance {100 * best['acceptance_rate']:.1f}%")
    if not config.sample and frame["divergences"].sum() > 0:
        print("warning: some greedy outputs diverge from the baseline's (more than a rounding tie); see divergences")
    elif not config.sample and frame["near_ties"].sum() > 0:
        print(f"{int(frame['near_ties'].sum())} greedy outputs differ from the baseline's by rounding near ties "
              "(half precision; see README)")
    sweep_plot(frame, "tokens_per_second_median", "self-speculative tokens/s", out / "sweep_tokens_per_second")
    sweep_plot(frame, "acceptance_rate", "acceptance rate", out / "sweep_acceptance")
    print(f"results in {csv_path} and sweep_*.png/pdf")
    return 0


def same_settings(saved: dict, settings: dict) -> bool:
    """Whether a sweep directory's saved flags are these (its output_dir aside: sweeps written before it was
    left out still match)."""
    saved = json.loads(json.dumps(saved))
    saved.get("model", {})["output_dir"] = None
    return saved == json.loads(json.dumps(settings))


def finished_points(path, repair: bool) -> set[tuple[int, int]]:
    """The points of sweep.csv's complete rows. A torn last row (the process killed while writing it) is not one;
    with `repair` it is cut off the file, so the next row starts on a line of its own."""
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1] or ",".join(COLUMNS) + "\n"
        if repair:
            path.write_text(text)
    if text.split("\n", 1)[0] != ",".join(COLUMNS):
        raise UsageError(f"{path} has other columns (an older version's sweep); use another --output_dir")
    rows = csv.DictReader(io.StringIO(text))
    return {(int(r["exit_layer"]), int(r["num_speculations"])) for r in rows if None not in r and None not in r.values()}


def run_shared(runner, prompts: list[list[int]]):
    """Every prompt through the runner, the prompts split over the processes; the samples in prompt order on
    rank 0, None on the others."""
    local = [dataclasses.replace(runner.run(p), prompt_id=i) for i, p in distributed.shard(prompts)]
    gathered = distributed.gather(local)
    return None if gathered is None else sorted(gathered, key=lambda s: s.prompt_id)


def measure_baseline(out, model, tokenizer, config, seed, prompts, warmup) -> dict | None:
    """hf_generate on every prompt, once per sweep directory (reused when the sweep resumes); None off rank 0."""
    path = out / "sweep_baseline.json"
    if path.exists():
        return json.loads(path.read_text())
    runner = RUNNERS["hf_generate"](model, tokenizer, config, seed)
    for _ in range(warmup):
        runner.run(prompts[0])
    samples = run_shared(runner, prompts)
    if samples is None:
        return None
    baseline = summarize(samples) | {"outputs": [s.tokens for s in samples], "settings": runner.settings}
    write_json(path, baseline)
    return baseline


if __name__ == "__main__":
    sys.exit(run(main))
