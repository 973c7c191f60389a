"""Per-exit-layer report for one or more models: top-1 agreement of every early exit with the last layer on
HumanEval solutions (teacher-forced), greedy self-speculative acceptance at every exit on HumanEval prompts, and the
speed every (exit layer, draft length) is predicted to reach on this machine, with the best one; and the last
layer's cross-entropy on all 164 canonical solutions (the quality the exits must not be bought with).

    python exits.py                                                  # the embedded model
    python exits.py --models runs/a/model runs/b/model --labels a b --pass_costs logs/pass_costs.json

Acceptance and predictions come from one greedy generation per prompt, replayed for every (E, d) (exact for
greedy decoding; see self_speculation/analysis.py), and from pass costs measured here, or read from a
pass_costs.json written by an earlier run on a quiet machine (costs depend on the shape, not the weights).
"""

import csv
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from arguments import parse, run
from self_speculation import UsageError, layers
from self_speculation.analysis import exit_report, humaneval_problems, read_costs, recommend, save_costs
from self_speculation.errors import check_range
from self_speculation.loading import DEFAULT_MODEL, load
from self_speculation.results import ensure_output_dir

MAX_SPECULATIONS = 64  # each draft length is a replay of every trace; the costs are measured up to the longest


@dataclass
class ExitsArguments:
    models: list[str] = field(default_factory=lambda: [str(DEFAULT_MODEL)],
                              metadata={"help": "model directories or hub ids (default: the embedded model)"})
    labels: list[str] = field(default_factory=list, metadata={"help": "a name per model (default: the paths)"})
    num_samples: int = field(default=20, metadata={"help": "HumanEval problems to use"})
    num_speculations: int | None = field(default=None, metadata={
        "help": "draft length of the per-exit acceptance column, at most --max_speculations (default: 4, or "
                "--max_speculations if smaller)"})
    max_speculations: int = field(default=8, metadata={"help": "predict draft lengths 1 to this (at most 64)"})
    max_steps: int = field(default=128, metadata={"help": "tokens generated per prompt"})
    exit_layers: list[int] = field(default_factory=list, metadata={"help": "exit layers to predict (default: all)"})
    recommend: bool = field(
        default=False, metadata={"help": "write the predicted best (exit_layer, num_speculations) into the model's "
                                         "config.json (`layerskip`), which every script then uses by default; one "
                                         "local model directory only"})
    pass_costs: str | None = field(
        default=None, metadata={"help": "read pass costs from this pass_costs.json instead of measuring them (one "
                                        "file for every model: costs depend on the shape, not the weights)"})
    output_dir: str = field(default="./logs", metadata={"help": "where exits.csv, predictions.csv and the measured "
                                                                "pass costs go (pass_costs.json; with several models "
                                                                "pass_costs_LABEL.json each)"})

    def __post_init__(self):
        if self.labels and len(self.labels) != len(self.models):
            raise UsageError("--labels needs one name per --models entry")
        names = self.labels or self.models
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise UsageError(f"--labels names {twice} twice: each model needs its own columns" if self.labels else
                             f"--models lists {twice} twice; give --labels to tell the runs apart")
        if not 1 <= self.num_samples <= 164:
            raise UsageError(f"--num_samples must be in [1, 164] (got {self.num_samples})")
        check_range("--max_speculations", self.max_speculations, 1, MAX_SPECULATIONS)
        check_range("--max_steps", self.max_steps, 1)
        if self.num_speculations is None:
            self.num_speculations = min(4, self.max_speculations)
        check_range("--num_speculations", self.num_speculations, 1, self.max_speculations)
        for layer in self.exit_layers:
            check_range("--exit_layers", layer, 1)
        if self.recommend and (len(self.models) != 1 or not (Path(self.models[0]) / "config.json").is_file()):
            raise UsageError("--recommend needs exactly one local model directory in --models")
        if self.pass_costs and not Path(self.pass_costs).is_file():
            raise UsageError(f"--pass_costs {self.pass_costs}: no such file")


ARGUMENTS = (ExitsArguments,)
SAFE = r"[^\w.-]"  # what a label may not bring into a file name


def main(argv=None) -> int:
    (args,) = parse(ARGUMENTS, argv, doc=__doc__)
    out = ensure_output_dir(args.output_dir)
    problems = humaneval_problems()[: args.num_samples]
    speculations = list(range(1, args.max_speculations + 1))
    reports = []
    for label, name in zip(args.labels or args.models, args.models):
        model, tokenizer = load(name, dtype="float32", flag="--models")
        count = layers.num_layers(model)
        exit_layers = args.exit_layers or list(range(1, count))
        if any(not 1 <= e < count for e in exit_layers):
            raise UsageError(f"--exit_layers must be in [1, {count - 1}] for {name}")
        costs = read_costs(args.pass_costs, model, args.max_speculations, exit_layers) if args.pass_costs else None
        reports.append(exit_report(label, model, tokenizer, problems, args.max_steps, exit_layers, speculations,
                                   args.max_speculations, costs))
        if costs is None:  # one file per model: two models' costs in one file kept only the last one's
            file = "pass_costs.json" if len(args.models) == 1 else f"pass_costs_{re.sub(SAFE, '_', label)}.json"
            save_costs(out / file, name, model, args.max_speculations, reports[-1].costs)
    table = {}
    for report in reports:
        for layer, cells in report.cells(args.num_speculations).items():
            table.setdefault(layer, {}).update(cells)
    columns = list(dict.fromkeys(c for row in table.values() for c in row))
    with (out / "exits.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["exit_layer"] + columns] + [[layer] + [row.get(c, "") for c in columns]
                                                              for layer, row in sorted(table.items())])
    grid = [{"model": r.label} | dataclasses.asdict(p) for r in reports for p in r.predictions]
    with (out / "predictions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(grid[0]))
        writer.writeheader()
        writer.writerows(grid)
    print("| exit layer | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
    for layer, row in sorted(table.items()):
        print(f"| {layer} | " + " | ".join(row.get(c, "") for c in columns) + " |")
    for report in reports:
        print(report.summary())
    print(f"written to {out / 'exits.csv'}, {out / 'predictions.csv'}")
    if args.recommend:
        print(recommend(Path(args.models[0]), reports[0].best))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
