"""Train a model with the LayerSkip recipe (layer dropout + early-exit loss), from scratch or from a checkpoint.

    python train.py --output_dir runs/stdlib                 # from scratch on the standard library's source
    python train.py --output_dir runs/stdlib --resume        # continue an interrupted run exactly
    python train.py --output_dir runs/ablation --p_max 0 --curriculum none   # the same model without the recipe
"""

import sys

from arguments import parse, run
from self_speculation.training import TrainConfig, train


ARGUMENTS = (TrainConfig,)


def main(argv: list[str] | None = None) -> int:
    (config,) = parse(ARGUMENTS, argv)
    final = train(config)
    print(f"model saved to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
