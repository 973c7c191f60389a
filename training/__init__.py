"""Training with the LayerSkip recipe (layer dropout, the early-exit loss, its curricula, self-distillation), on
one process, DDP replicas or FSDP shards: what `train.py` runs. It computes the layers with the decoding
package's layer runner (`self_speculation.layers`), so a trained model's exits are the ones decoding uses."""

from .trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
