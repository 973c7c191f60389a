"""Per-exit-layer report for one or more models: top-1 agreement of every early exit with the last layer on
HumanEval solutions (teacher-forced), and greedy self-speculative acceptance on HumanEval prompts.

    python exits.py --models runs/layerskip/model runs/baseline/model --labels layerskip baseline
"""

import csv
import sys
from dataclasses import dataclass, field

from arguments import parse, run
from self_speculation import UsageError
from self_speculation.analysis import acceptance_by_exit, exit_agreement, humaneval_problems
from self_speculation.loading import DEFAULT_MODEL, load
from self_speculation.results import ensure_output_dir


@dataclass
class ExitsArguments:
    models: list[str] = field(default_factory=lambda: [str(DEFAULT_MODEL)],
                              metadata={"help": "model directories or hub ids (default: the embedded model)"})
    labels: list[str] = field(default_factory=list, metadata={"help": "a name per model (default: the paths)"})
    num_samples: int = field(default=20, metadata={"help": "HumanEval problems to use"})
    num_speculations: int = field(default=4, metadata={"help": "draft length for the acceptance measurement"})
    max_steps: int = field(default=128, metadata={"help": "tokens generated per prompt"})
    exit_layers: list[int] = field(default_factory=list, metadata={"help": "exit layers to measure acceptance at (default: all)"})
    output_dir: str = field(default="./logs", metadata={"help": "where exits.csv goes"})

    def __post_init__(self):
        if self.labels and len(self.labels) != len(self.models):
            raise UsageError("--labels needs one name per --models entry")
        if not 1 <= self.num_samples <= 164:
            raise UsageError(f"--num_samples must be in [1, 164] (got {self.num_samples})")


def main(argv=None) -> int:
    (args,) = parse((ExitsArguments,), argv)
    out = ensure_output_dir(args.output_dir)
    problems = humaneval_problems()[: args.num_samples]
    labels = args.labels or args.models
    columns, table = {}, {}
    for label, name in zip(labels, args.models):
        model, tokenizer = load(name)
        sequences = [tokenizer(p["prompt"] + p["canonical_solution"]).input_ids for p in problems]
        agreement = exit_agreement(model, sequences)
        exit_layers = args.exit_layers or list(range(1, len(agreement)))
        acceptance = acceptance_by_exit(model, tokenizer, [p["prompt"] for p in problems], exit_layers,
                                        args.num_speculations, args.max_steps)
        for layer in range(1, len(agreement)):
            table.setdefault(layer, {})[f"{label} agreement"] = agreement[layer - 1]
            if layer in acceptance:
                table[layer][f"{label} acceptance"] = acceptance[layer]
        columns.update({f"{label} agreement": None, f"{label} acceptance": None})
    header = ["exit_layer"] + list(columns)
    with (out / "exits.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for layer, values in sorted(table.items()):
            writer.writerow([layer] + [f"{values[c]:.4f}" if c in values else "" for c in columns])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for layer, values in sorted(table.items()):
        cells = [f"{100 * values[c]:.1f}%" if c in values else "" for c in columns]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    print(f"written to {out / 'exits.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
