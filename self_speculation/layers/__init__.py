"""The layer runner: the only code that touches transformers' decoder internals, one module per job.

- cache.py: `KVCache`, one cache for a batch of any size (one prompt: a batch of one), each row with its own
  length; it says where a pass writes and what its queries see.
- weights.py: `Weights`, a model's layers as plain tensors with joined projections, held by whoever decodes.
- runner.py: `layer_pass`, the one loop over decoder layers, and `Decoder`, the passes decoding makes of it
  (full forward, early exit, the verification remainder, a batch's prefill) as thin calls.
- compiled.py: `CompiledPasses`, the same loop through torch.compile over a cache's whole buffers.
- check.py: the load-time checks (the Llama layout; our forward equals `model(...)`).

Every forward pass of the project (decoding, scoring, training) runs `layer_pass`.
"""

from .cache import KVCache, cache_bytes, new_cache, unseen, upload
from .check import HALF_PRECISION_TOLERANCE, check_forward, check_layout, num_layers
from .compiled import CompiledPasses, capacity_bucket, graph_cache
from .runner import Decoder, EarlyExit, early_exit, embed, full_forward, head, layer_pass, run_layers
from .weights import LayerWeights, Weights

__all__ = ["CompiledPasses", "capacity_bucket", "graph_cache", "Decoder", "EarlyExit", "HALF_PRECISION_TOLERANCE", "KVCache", "LayerWeights",
           "Weights", "cache_bytes", "check_forward", "check_layout", "early_exit", "embed", "full_forward", "head",
           "layer_pass", "new_cache", "num_layers", "run_layers", "unseen", "upload"]
