"""Train a model with the LayerSkip recipe (layer dropout + early-exit loss), from scratch or from a checkpoint.

    python train.py --output_dir runs/stdlib                 # from scratch on the standard library's source
    python train.py --output_dir runs/stdlib --resume        # continue an interrupted run exactly
    python train.py --output_dir runs/ablation --p_max 0 --curriculum none   # the same model without the recipe
    torchrun --nproc_per_node 8 train.py --output_dir runs/7b --init_from facebook/layerskip-llama2-7B \\
        --fsdp True --dtype bfloat16 ...                     # a model sharded over 8 GPUs
"""

import sys

import torch.distributed as dist

from arguments import parse, run
from self_speculation import distributed
from self_speculation.errors import UsageError
from training import TrainConfig, train


ARGUMENTS = (TrainConfig,)


def main(argv: list[str] | None = None) -> int:
    try:
        (config,) = parse(ARGUMENTS, argv, doc=__doc__)
        final = train(config)
    except UsageError:
        if distributed.rank() > 0 and not dist.is_initialized():
            return 2  # refused before the processes met: every one of them refuses alike, and the first says why
        raise
    if distributed.rank() == 0:
        print(f"model saved to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
