"""A model's decoder layers as plain tensors, the form the layer runner computes with, held by whoever runs it."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..errors import UsageError

Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer. The q, k, v projections and the gate and up projections are each one matrix (`qkv`,
    `gate_up`) when the weights are frozen; trainable weights are joined on every call instead, so that gradients
    reach the parameters."""

    attn_norm: torch.Tensor
    attn_eps: float
    qkv_parts: tuple[Linear, Linear, Linear]
    qkv: Linear | None
    o: Linear
    mlp_norm: torch.Tensor
    mlp_eps: float
    gate_up_parts: tuple[Linear, Linear]
    gate_up: Linear | None
    down: Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    window: int | None  # sliding-window attention: a query sees this many positions, itself included


def joined(parts) -> Linear:
    """One linear map computing the outputs of `parts` side by side."""
    weight = torch.cat([w for w, _ in parts])
    if all(b is None for _, b in parts):
        return weight, None
    return weight, torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])


def _adjacent(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The matrix the row-major `tensors` make together when they already lie one after another in one storage
    (as `_join` leaves them), as a view; else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset or t.shape[1:] != first.shape[1:]):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))


@torch.no_grad()
def _join(modules) -> Linear:
    """The frozen linear `modules` as one matrix, without a second copy: their weights are copied into it once
    and the parameters (the same Parameter objects, with the same values) then read their rows of it. A model
    joined before (by another holder) is not copied again."""
    weight, biases = _adjacent([m.weight for m in modules]), [m.bias for m in modules]
    if weight is not None and all(b is None for b in biases):
        return weight, None
    if weight is not None and None not in biases and (bias := _adjacent(biases)) is not None:
        return weight, bias
    weight, bias = joined([(m.weight, m.bias) for m in modules])
    row = 0
    for m in modules:
        rows = slice(row, row + m.weight.shape[0])
        m.weight.data = weight[rows]
        if m.bias is not None:
            m.bias.data = bias[rows]
        row = rows.stop
    return weight, bias


def _layer_weights(layer, config) -> LayerWeights:
    try:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
        if any(p.device.type == "meta" for p in layer.parameters()):
            raise UsageError("the model's weights are offloaded (not all in memory); this toolkit runs the layers "
                             "from their weights, so use a --device_map that fits the model on the devices")
        frozen = not any(p.requires_grad for p in layer.parameters())
        joined_qkv, joined_gate_up = (_join(qkv), _join(gate_up)) if frozen else (None, None)
        linear = lambda m: (m.weight, m.bias)  # noqa: E731
        window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        act = F.silu if getattr(config, "hidden_act", None) in ("silu", "swish") else mlp.act_fn
        return LayerWeights(
            layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
            tuple(map(linear, qkv)), joined_qkv, linear(attn.o_proj),
            layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
            tuple(map(linear, gate_up)), joined_gate_up, linear(mlp.down_proj), act,
            config.num_attention_heads, config.num_key_value_heads, attn.head_dim, attn.scaling, window,
        )
    except AttributeError as e:
        raise UsageError(f"{type(layer).__name__} is not a Llama-style decoder layer ({e})") from None


class Weights:
    """Every layer's `LayerWeights`, read from the model when first needed and again after it was moved or cast.
    Freeze the weights first (`requires_grad_(False)`, as `load` does) to get the joined projections."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.identity, self.layers = None, []  # a layer's LayerWeights, or None until first used

    def _identity(self) -> tuple:
        """What changes when the model is moved, cast or given new parameters (`Module.to` swaps a parameter's
        data, not the parameter): then the joined matrices are stale. Read on every pass, so kept to one tensor."""
        weight = self.model.model.layers[0].input_layernorm.weight
        return weight.data_ptr(), weight.dtype, weight.device, weight.requires_grad

    def __call__(self, start: int, end: int) -> list[LayerWeights]:
        """Layers [start, end), each read on first use."""
        identity = self._identity()
        if identity != self.identity:
            self.layers = [None] * len(self.model.model.layers)
            self.identity = identity
        for i in range(start, end):
            if self.layers[i] is None:
                self.layers[i] = _layer_weights(self.model.model.layers[i], self.model.config)
        return self.layers[start:end]
