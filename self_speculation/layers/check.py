"""The load-time checks: a model in the Llama decoder layout, whose layers the runner computes as `model(...)` does."""

import copy

import torch
from transformers import PreTrainedModel

from ..errors import UsageError
from .cache import new_cache
from .runner import full_forward

LAYOUT = ("model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")


def check_layout(model: PreTrainedModel) -> None:
    """Raise UsageError naming the first missing piece of the Llama layout."""
    for path in LAYOUT:
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                raise UsageError(
                    f"{type(model).__name__} does not have the Llama decoder layout this toolkit runs: "
                    f"model.{path} is missing (supported: Llama, Mistral, Qwen2, SmolLM and models built like them)"
                )


def num_layers(model: PreTrainedModel) -> int:
    return len(model.model.layers)


HALF_PRECISION_TOLERANCE = 8.0  # in eps(dtype)·sqrt(layers) of the largest logit; measured, see check_forward


def check_forward(model: PreTrainedModel, ids: list[int] | None = None) -> None:
    """Refuse a model whose layers our runner would compute differently from `model(...)`: one that embeds,
    scales or caps differently from the Llama layout (Gemma, Qwen 3), or holds weights it cannot read.

    The maths is compared in float32, where both computations agree to 1e-3 of the largest logit: on the model
    itself, or, for a model in half precision, on a float32 replica of its first two layers built from its config
    (random weights: the maths is the code and the config, not the values). In half precision, rounding makes two
    correct computations differ by an amount that grows with depth, and far more on tokens with extreme activations
    (special tokens); so the model itself is then compared in its own dtype on ordinary tokens (`ids`, else ids from
    the middle of the vocabulary), allowing HALF_PRECISION_TOLERANCE × eps × sqrt(layers) of the largest logit:
    measured here at most 3.6 of those units for a 32-layer random model in float16 and 2.5 in bfloat16, against 26
    for a model with other maths (Qwen 3's query and key norms) in bfloat16."""
    check_layout(model)
    dtype = model.lm_head.weight.dtype
    if dtype == torch.float32:
        _compare_with_transformers(model, torch.arange(1, 9), 1e-3)
        return
    _compare_with_transformers(_float32_replica(model), torch.arange(1, 9), 1e-3)
    vocab = model.config.vocab_size
    ordinary = torch.tensor(ids[:16]) if ids else torch.arange(8) * max(vocab // 17, 1) + vocab // 4
    tolerance = HALF_PRECISION_TOLERANCE * torch.finfo(dtype).eps * num_layers(model) ** 0.5
    _compare_with_transformers(model, ordinary, tolerance)


def _float32_replica(model: PreTrainedModel) -> PreTrainedModel:
    """The model's class and config with two layers, a small vocabulary and random float32 weights, on the CPU."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = min(2, config.num_hidden_layers)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    config.vocab_size = min(config.vocab_size, 256)
    if config.pad_token_id is not None and config.pad_token_id >= config.vocab_size:
        config.pad_token_id = None
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        replica = type(model)._from_config(config, dtype=torch.float32)
    return replica.eval().requires_grad_(False)


def _compare_with_transformers(model: PreTrainedModel, ids: torch.Tensor, tolerance: float) -> None:
    device = model.lm_head.weight.device
    ids = ids.remainder(model.config.vocab_size).unsqueeze(0).to(device)  # (1, T)
    with torch.inference_mode():
        ours = full_forward(model, ids, new_cache())
        theirs = model(input_ids=ids, use_cache=False).logits.float()
    scale = theirs.abs().max().clamp_min(1.0)
    if not torch.allclose(ours, theirs, atol=tolerance * scale.item(), rtol=0):
        raise UsageError(
            f"{type(model).__name__}: running its layers one by one does not reproduce model(...) "
            "(the model computes something outside the Llama layout); it is not supported"
        )
