"""The layer runner: the only module that touches transformers' decoder internals.

Every forward pass of the project (full model, early exit, verification of drafts) is a thin call of
`run_layers`, which runs `model.model.layers[start:end]` over hidden states with one shared `Cache`.
The cache is transformers' own `DynamicCache`; its layers may hold different lengths while drafting
(the first `exit_layer` layers run ahead of the rest), so positions and the causal mask are always taken
from the cache of the first layer being run.
"""

from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .errors import UsageError

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


def new_cache() -> Cache:
    """One cache shared by drafting and verification; every layer keeps every position it has seen."""
    return DynamicCache()


def _mask_function(config):
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return create_sliding_window_causal_mask
    return create_causal_mask


def run_layers(
    model: PreTrainedModel, hidden: torch.Tensor, cache: Cache | None, start: int, end: int
) -> torch.Tensor:
    """Run decoder layers [start, end) over `hidden` (B, T, H); each of their caches grows by T positions.
    Without a cache (training) the sequence starts at position 0."""
    past = cache.get_seq_length(start) if cache is not None else 0
    positions = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
    rotary = model.model.rotary_emb(hidden, positions)
    mask = _mask_function(model.config)(
        config=model.config,
        inputs_embeds=hidden,
        attention_mask=None,
        past_key_values=cache,
        position_ids=positions,
        layer_idx=start,
    )
    for layer in model.model.layers[start:end]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=rotary,
        )
    return hidden


def embed(model: PreTrainedModel, token_ids: torch.Tensor) -> torch.Tensor:
    return model.model.embed_tokens(token_ids)  # (B, T, H)


def head(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head: the same exit for every layer, as the LayerSkip recipe trains it."""
    return model.lm_head(model.model.norm(hidden)).float()  # (B, T, V)


def full_forward(model: PreTrainedModel, token_ids: torch.Tensor, cache: Cache, last_only: bool = False) -> torch.Tensor:
    """Logits of the whole model (B, T, V), or of the last position only (B, 1, V)."""
    hidden = run_layers(model, embed(model, token_ids), cache, 0, num_layers(model))
    return head(model, hidden[:, -1:] if last_only else hidden)


@dataclass
class EarlyExit:
    logits: torch.Tensor  # (B, T, V) from the final norm and head applied at the exit layer
    hidden: torch.Tensor  # (B, T, H) the exit layer's output, kept for verification (the exit query cache)


def early_exit(
    model: PreTrainedModel, token_ids: torch.Tensor, cache: Cache, exit_layer: int, last_only: bool = False
) -> EarlyExit:
    hidden = exit_hidden(model, token_ids, cache, exit_layer)
    return EarlyExit(head(model, hidden[:, -1:] if last_only else hidden), hidden)


def exit_hidden(model: PreTrainedModel, token_ids: torch.Tensor, cache: Cache, exit_layer: int) -> torch.Tensor:
    """Output of layers [0, exit_layer) without the head (B, T, H)."""
    return run_layers(model, embed(model, token_ids), cache, 0, exit_layer)


def remainder(model: PreTrainedModel, exit_hiddens: torch.Tensor, cache: Cache, exit_layer: int) -> torch.Tensor:
    """Full-model logits (B, T, V) from exit-layer hidden states: layers [exit_layer, L), norm, head."""
    return head(model, run_layers(model, exit_hiddens, cache, exit_layer, num_layers(model)))


def rollback(cache: Cache, positions: int) -> None:
    """Forget the last `positions` entries of every layer (rejected drafts)."""
    if positions:
        cache.crop(-positions)


def check_forward(model: PreTrainedModel, tolerance: float | None = None) -> None:
    """Compare our full forward with the model's own on a few tokens; a model that embeds, scales or caps
    differently from the Llama layout (Gemma, for one) would otherwise give silently wrong output."""
    check_layout(model)
    device = model.lm_head.weight.device
    ids = torch.arange(1, 9, device=device).remainder(model.config.vocab_size).unsqueeze(0)  # (1, 8)
    with torch.inference_mode():
        ours = full_forward(model, ids, new_cache())
        theirs = model(input_ids=ids, use_cache=False).logits.float()
    if tolerance is None:
        tolerance = 1e-3 if model.lm_head.weight.dtype == torch.float32 else 5e-2
    scale = theirs.abs().max().clamp_min(1.0)
    if not torch.allclose(ours, theirs, atol=tolerance * scale.item(), rtol=0):
        raise UsageError(
            f"{type(model).__name__}: running its layers one by one does not reproduce model(...) "
            "(the model computes something outside the Llama layout); it is not supported"
        )
