"""The layer runner: the only module that touches transformers' decoder internals.

Every forward pass of the project (full model, early exit, verification of drafts, training) is a thin call of
`run_layers`, which runs `model.model.layers[start:end]` over hidden states with one shared cache.

`run_layers` computes each decoder layer from the layer's own weights with a handful of tensor operations
(RMSNorm, projections, rotary, SDPA, gated MLP) instead of calling the layer module: on a small model a decoded
token's time is mostly per-operation overhead, and the module path spends about twice as many operations.
`check_forward` compares the result with `model(...)` when a model is loaded, so a model whose layers compute
something else is refused rather than run wrongly.

The cache is a transformers `Cache` of `PositionLayer`s: buffers written by position. Its layers may hold
different lengths while drafting (the first `exit_layer` layers run ahead of the rest), so positions and the
mask are always taken from the first layer being run; rejected drafts are rolled back by moving a length back,
and the next token overwrites them.
"""

import copy
from collections.abc import Callable, Iterable
from functools import partial
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

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


class PositionLayer(CacheLayerMixin):
    """One layer's keys and values (B, heads, capacity, head_dim), written at `length`. Capacity doubles when
    full, so a generation reallocates O(log n) times; `crop(-n)` only moves `length` back."""

    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int = 256):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # zeros, not garbage: a compiled pass attends over the whole buffer with unwritten slots masked, and a
        # masked NaN would still poison the weighted sum
        self.keys = key_states.new_zeros((*key_states.shape[:2], self.capacity, key_states.shape[3]))
        self.values = value_states.new_zeros((*value_states.shape[:2], self.capacity, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.keys.shape[2]:
            self.keys, self.values = (self._grown(t, end) for t in (self.keys, self.values))
        self.keys.narrow(2, self.length, end - self.length).copy_(key_states)
        self.values.narrow(2, self.length, end - self.length).copy_(value_states)
        self.length = end
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)

    def _grown(self, buffer: torch.Tensor, needed: int) -> torch.Tensor:
        bigger = buffer.new_zeros((*buffer.shape[:2], max(needed, 2 * buffer.shape[2]), buffer.shape[3]))
        bigger[:, :, : self.length] = buffer[:, :, : self.length]
        return bigger

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove positions (transformers' convention: a negative count)."""
        self.length = max(self.length + min(tokens_to_remove, 0), 0)

    def reset(self) -> None:
        self.length = 0


class PositionCache(Cache):
    """One cache shared by drafting and verification; every layer keeps every position it has seen."""

    def __init__(self, capacity: int = 256):
        super().__init__(layer_class_to_replicate=lambda: PositionLayer(capacity))


def new_cache(capacity: int = 256) -> PositionCache:
    return PositionCache(capacity)


class RaggedLayer(PositionLayer):
    """Keys and values of B rows (B, heads, capacity, head_dim), each row with its own length (`lengths`, (B,)):
    a pass writes row b's T new positions at lengths[b]..lengths[b] + T - 1. Slots past a row's length hold
    padding or rejected drafts; the mask hides them and the next writes overwrite them.

    The lengths are kept twice: on the cache's device, where positions and masks are computed, and on the host
    (`host_lengths`), where the longest row sizes a pass; reading that from a GPU would wait for it at every layer."""

    def __init__(self, capacity: int, batch: int):
        super().__init__(capacity)
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.host_lengths = torch.zeros(batch, dtype=torch.long)

    def longest(self) -> int:
        return int(self.host_lengths.max())

    def set_lengths(self, host_lengths: torch.Tensor) -> None:
        self.host_lengths = host_lengths.cpu()
        self.lengths = host_lengths.to(self.lengths.device)

    def advance(self, T: int) -> None:
        """Every row has T more positions (a pass wrote them)."""
        self.lengths = self.lengths + T
        self.host_lengths = self.host_lengths + T

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.lengths = self.lengths.to(key_states.device)
        B, _, T, _ = key_states.shape
        slots = self.lengths[:, None] + torch.arange(T, device=key_states.device)  # (B, T)
        end = self.longest() + T
        if end > self.keys.shape[2]:
            self.length = self.longest()
            self.keys, self.values = (self._grown(t, end) for t in (self.keys, self.values))
        rows = torch.arange(B, device=key_states.device)[:, None]
        self.keys[rows, :, slots] = key_states.transpose(1, 2)  # (B, T, heads, head_dim) into row b's slots
        self.values[rows, :, slots] = value_states.transpose(1, 2)
        self.advance(T)
        self.length = end
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)

    def get_seq_length(self) -> int:
        return self.longest()


class RaggedCache(Cache):
    """A cache for a batch of sequences of different lengths: `RaggedLayer`s, rows set and rolled back one by one."""

    def __init__(self, capacity: int, batch: int):
        super().__init__(layer_class_to_replicate=lambda: RaggedLayer(capacity, batch))
        self.batch = batch

    def row_lengths(self, layer: int) -> tuple[torch.Tensor, int]:
        """(B,) positions each row holds in `layer` (zeros before its first pass), and the longest of them."""
        if layer < len(self.layers) and self.layers[layer].is_initialized:
            return self.layers[layer].lengths, self.layers[layer].longest()
        return torch.zeros(self.batch, dtype=torch.long), 0

    def set_row_lengths(self, lengths: torch.Tensor) -> None:
        """After a padded prefill: row b holds lengths[b] real positions in every layer."""
        for layer in self.layers:
            layer.set_lengths(lengths)

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (finished ones), so that passes no longer compute them."""
        for layer in self.layers:
            index = torch.tensor(rows, device=layer.lengths.device)
            layer.lengths, layer.host_lengths = layer.lengths[index], layer.host_lengths[rows]
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.batch = len(rows)

    def rollback_rows(self, counts: torch.Tensor) -> None:
        """Forget the last counts[b] positions of row b in every layer (its rejected drafts); `counts` on the host."""
        on_device = {}  # counts copied once per device, not once per layer
        for layer in self.layers:
            device = layer.lengths.device
            if device not in on_device:
                on_device[device] = counts.to(device)
            layer.lengths, layer.host_lengths = layer.lengths - on_device[device], layer.host_lengths - counts


def cache_bytes(cache: Cache) -> int:
    return sum(t.nbytes for layer in cache.layers if layer.is_initialized for t in (layer.keys, layer.values))


Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer as plain tensors: what `_layer` computes with. The q, k, v projections and the gate and
    up projections are each one matrix (`qkv`, `gate_up`) when the weights are frozen; the modules' parameters are
    then views of those matrices, so nothing is copied. Trainable weights are joined on every call instead, so
    that gradients reach the parameters."""

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


def _joined(parts) -> Linear:
    """One linear map computing the outputs of `parts` side by side."""
    weight = torch.cat([w for w, _ in parts])
    if all(b is None for _, b in parts):
        return weight, None
    return weight, torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])


@torch.no_grad()
def _fused(modules) -> Linear:
    """Join frozen linear modules into one matrix and make their parameters views of it (no second copy)."""
    weight, bias = _joined([(m.weight, m.bias) for m in modules])
    row = 0
    for m in modules:
        rows = slice(row, row + m.weight.shape[0])
        m.weight = torch.nn.Parameter(weight[rows], requires_grad=False)
        if m.bias is not None:
            m.bias = torch.nn.Parameter(bias[rows], requires_grad=False)
        row = rows.stop
    return weight, bias


def _weights(layer, config) -> LayerWeights:
    try:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
        if any(p.device.type == "meta" for p in layer.parameters()):
            raise UsageError("the model's weights are offloaded (not all in memory); this toolkit runs the layers "
                             "from their weights, so use a --device_map that fits the model on the devices")
        frozen = not any(p.requires_grad for p in layer.parameters())
        fused_qkv, fused_gate_up = (_fused(qkv), _fused(gate_up)) if frozen else (None, None)
        linear = lambda m: (m.weight, m.bias)  # noqa: E731
        window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        act = F.silu if getattr(config, "hidden_act", None) in ("silu", "swish") else mlp.act_fn
        return LayerWeights(
            layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
            tuple(map(linear, qkv)), fused_qkv, linear(attn.o_proj),
            layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
            tuple(map(linear, gate_up)), fused_gate_up, linear(mlp.down_proj), act,
            config.num_attention_heads, config.num_key_value_heads, attn.head_dim, attn.scaling, window,
        )
    except AttributeError as e:
        raise UsageError(f"{type(layer).__name__} is not a Llama-style decoder layer ({e})") from None


_WEIGHTS: WeakKeyDictionary = WeakKeyDictionary()  # model -> (parameters' identity, [LayerWeights])


def _identity(model: PreTrainedModel) -> tuple:
    """What changes when a model is moved, cast or given new parameters (`Module.to` swaps a parameter's data, not
    the parameter): then its joined weights are stale. Read on every pass, so kept to one tensor."""
    weight = model.model.layers[0].input_layernorm.weight
    return weight.data_ptr(), weight.dtype, weight.device


def layer_weights(model: PreTrainedModel) -> list[LayerWeights]:
    """The layers' weights, read once per model and again after it is moved or cast. Freeze the weights first
    (`requires_grad_(False)`, as `load` does) to get the joined projections."""
    identity, weights = _WEIGHTS.get(model, (None, None))
    if identity != _identity(model):
        weights = [_weights(layer, model.config) for layer in model.model.layers]
        _WEIGHTS[model] = (_identity(model), weights)
    return weights


def _mask(past: int, length: int, window: int | None, hidden: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Which cached keys the queries at positions past..past+length-1 see: (additive mask (length, keys) or None,
    first key). A single query without a window sees every key, so it needs no mask; an additive mask is
    cheaper for SDPA on the CPU than a boolean one."""
    first = 0 if window is None else max(past + 1 - window, 0)
    if length == 1:
        return None, first
    queries = torch.arange(past, past + length, device=hidden.device)
    unseen = _unseen(queries, torch.arange(first, past + length, device=hidden.device), window)
    mask = torch.zeros(unseen.shape, dtype=hidden.dtype, device=hidden.device)
    return mask.masked_fill_(unseen, float("-inf")), first


def _unseen(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """(queries, keys) True where the query at that position may not see the key at that position: causal, and
    within the sliding window if there is one."""
    unseen = keys > queries[..., None]  # queries (T,) or (B, T): (T, keys) or (B, T, keys)
    if window is not None:
        unseen |= keys <= queries[..., None] - window
    return unseen


def _layer(w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache | None,
           index: int, masks: dict) -> torch.Tensor:
    """One decoder layer over x (B, T, H), the same maths as transformers' Llama layer."""
    B, T, _ = x.shape
    h = torch.rms_norm(x, x.shape[-1:], w.attn_norm, w.attn_eps)
    qkv = F.linear(h, *(w.qkv or _joined(w.qkv_parts))).view(B, T, w.heads + 2 * w.kv_heads, w.head_dim)
    qk, v = torch.split_with_sizes(qkv, (w.heads + w.kv_heads, w.kv_heads), dim=2)  # not Tensor.split: slower
    # rotary: x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) done as a swap of halves and a
    # sign folded into `sin` once per pass
    swapped = qk.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    q, k = torch.split_with_sizes(torch.addcmul(qk * cos, swapped, sin).transpose(1, 2), (w.heads, w.kv_heads), dim=1)
    v = v.transpose(1, 2)  # (B, heads, T, head_dim) from here on
    if cache is not None:
        k, v = cache.update(k, v, index)
    mask, first = masks[w.window]
    if first:
        k, v = k[:, :, first:], v[:, :, first:]
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=w.scale, enable_gqa=w.heads != w.kv_heads)
    x = x + F.linear(attn.transpose(1, 2).reshape(B, T, -1), *w.o)
    h = torch.rms_norm(x, x.shape[-1:], w.mlp_norm, w.mlp_eps)
    gate, up = F.linear(h, *(w.gate_up or _joined(w.gate_up_parts))).chunk(2, dim=-1)
    return x + F.linear(w.act(gate) * up, *w.down)


def run_layers(
    model: PreTrainedModel, hidden: torch.Tensor, cache: Cache | None, start: int, end: int,
    compiled: "CompiledPasses | None" = None,
) -> torch.Tensor:
    """Run decoder layers [start, end) over `hidden` (B, T, H); each of their caches grows by T positions.
    Without a cache (training) the sequence starts at position 0. A pass `compiled` holds runs compiled."""
    T = hidden.shape[1]
    if compiled is not None and cache is not None:
        out = compiled.run(hidden, cache, start, end)
        if out is not None:
            return out
    weights = layer_weights(model)[start:end]
    windows = {w.window for w in weights}
    if isinstance(cache, RaggedCache):
        lengths, longest = cache.row_lengths(start)
        positions, masks = _ragged_geometry(lengths.to(hidden.device), longest, T, windows, hidden)
    else:
        past = cache.get_seq_length(start) if cache is not None else 0
        positions = torch.arange(past, past + T, device=hidden.device)
        masks = {window: _mask(past, T, window, hidden) for window in windows}
    cos, sin = _rotary(model, hidden, positions)
    for index, w in enumerate(weights, start):
        if w.attn_norm.device != hidden.device:  # a model spread over devices (--device_map)
            hidden, cos, sin = (t.to(w.attn_norm.device) for t in (hidden, cos, sin))
            masks = {k: (m if m is None else m.to(hidden.device), first) for k, (m, first) in masks.items()}
        hidden = _layer(w, hidden, cos, sin, cache, index, masks)
    return hidden


def _ragged_geometry(lengths: torch.Tensor, longest: int, T: int, windows: set,
                     hidden: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Positions (B, T) of T new tokens after each row's `lengths`, and per window an additive mask
    (B, 1, T, keys) over the slots the cache returns (up to the `longest` row), hiding what each row may not see."""
    positions = lengths[:, None] + torch.arange(T, device=hidden.device)  # (B, T)
    slots = torch.arange(longest + T, device=hidden.device)
    masks = {}
    for window in windows:
        unseen = _unseen(positions, slots, window)  # (B, T, keys): causal, row by row
        mask = torch.zeros(unseen.shape, dtype=hidden.dtype, device=hidden.device).masked_fill_(unseen, float("-inf"))
        masks[window] = (mask[:, None], 0)
    return positions, masks


def _rotary(model: PreTrainedModel, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (1 or B, T, 1, head_dim) for `positions` (T,) or (B, T), with the sign of rotate_half folded
    into sin."""
    cos, sin = model.model.rotary_emb(hidden, positions if positions.dim() == 2 else positions.unsqueeze(0))
    half = sin.shape[-1] // 2
    return cos.unsqueeze(2), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(2)


# Compiled passes. A pass compiled for (start, end, T) attends over its layers' whole buffers with what is not
# written yet masked, and writes at tensor positions, so one compilation serves every step and, the buffer length
# being marked dynamic, every cache capacity.

class _BufferWrites:
    """What `_layer` needs of a cache inside a compiled pass: write keys and values at `positions`, return the
    whole buffers."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor, start: int):
        self.keys, self.values, self.positions, self.start = keys, values, positions, start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, index: int):
        keys, values = self.keys[index - self.start], self.values[index - self.start]
        if self.positions.dim() == 1:
            keys.index_copy_(2, self.positions, key_states)
            values.index_copy_(2, self.positions, value_states)
        else:  # a ragged batch: row b's tokens at its own positions (B, T)
            slots = self.positions[:, None, :, None].expand_as(key_states)
            keys.scatter_(2, slots, key_states)
            values.scatter_(2, slots, value_states)
        return keys, values


def _pass_over_buffers(model, weights, start, hidden, positions, keys, values):
    """Layers `weights` over `hidden` (B, T, H) at `positions`: (T,) shared by every row, or (B, T) for a ragged
    batch, whose masks then differ per row, (B, 1, T, keys)."""
    cos, sin = _rotary(model, hidden, positions)
    slots = torch.arange(keys[0].shape[2], device=hidden.device)
    masks = {}
    for window in {w.window for w in weights}:
        seen = ~_unseen(positions, slots, window)
        masks[window] = (seen if positions.dim() == 1 else seen[:, None], 0)
    writes = _BufferWrites(keys, values, positions, start)
    for index, w in enumerate(weights, start):
        hidden = _layer(w, hidden, cos, sin, writes, index, masks)
    return hidden


class _CompiledPass:
    """One pass of `_pass_over_buffers` through torch.compile. All passes share that function's code, so its first
    call (which compiles) keeps every value static but the marked capacity: otherwise dynamo would take what
    differs between passes (layer range, token count, another model's head counts) for dynamic values."""

    def __init__(self, model: PreTrainedModel, start: int, end: int):
        options = {"cpp_wrapper": True} if model.lm_head.weight.device.type == "cpu" else None  # less Python per call
        self.run = torch.compile(partial(_pass_over_buffers, model, tuple(layer_weights(model)[start:end]), start),
                                 fullgraph=True, options=options)
        self.compiled = False

    def __call__(self, *args) -> torch.Tensor:
        if self.compiled:
            return self.run(*args)
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=64):
            out = self.run(*args)
        self.compiled = True
        return out


class CompiledPasses:
    """The passes a decoder runs through torch.compile, (start layer, end layer, new tokens), each compiled on its
    first use. Whoever runs the passes holds this object (a Generator, a PassTimer): compiled code lives as long as
    its holder, and a new holder compiles for its own model."""

    def __init__(self, model: PreTrainedModel, shapes: Iterable[tuple[int, int, int]]):
        self.model = model
        self.shapes = frozenset(shapes)
        # (start, end, new tokens, ragged batch, dynamic batch size) -> its compiled pass
        self.passes: dict[tuple[int, int, int, bool, bool], _CompiledPass] = {}

    @property
    def shapes_run(self) -> set[tuple[int, int, int]]:
        """The shapes (start layer, end layer, new tokens) that have run compiled."""
        return {key[:3] for key in self.passes}

    def run(self, hidden: torch.Tensor, cache: Cache, start: int, end: int) -> torch.Tensor | None:
        """The pass over `hidden` (B, T, H) compiled, or None where this shape is not compiled or cannot run yet
        (the first pass allocates the cache's buffers; a full buffer would have to grow): the caller then runs
        the layers op by op."""
        B, T = hidden.shape[:2]
        run = cache.layers[start:end]
        if (start, end, T) not in self.shapes or len(run) < end - start or not all(l.is_initialized for l in run):
            return None
        ragged = isinstance(cache, RaggedCache)
        if ragged:
            positions = run[0].lengths[:, None] + torch.arange(T, device=hidden.device)  # (B, T)
            end_slot = run[0].longest() + T
        else:
            positions = torch.arange(run[0].length, run[0].length + T, device=hidden.device)
            end_slot = run[0].length + T
        if end_slot > run[0].keys.shape[2]:
            return None
        keys, values = [layer.keys for layer in run], [layer.values for layer in run]
        many = ragged and B > 1  # one compilation for every batch size from 2 (rows leave as they finish)
        if not hasattr(run[0].keys, "_dynamo_dynamic_indices"):
            for buffer in keys + values:
                torch._dynamo.mark_dynamic(buffer, 2)  # the capacity: one compilation for every cache size
                if many:
                    torch._dynamo.mark_dynamic(buffer, 0)
        if many:
            torch._dynamo.mark_dynamic(hidden, 0)
            torch._dynamo.mark_dynamic(positions, 0)
        key = (start, end, T, ragged, many)
        if key not in self.passes:
            self.passes[key] = _CompiledPass(self.model, start, end)
        out = self.passes[key](hidden, positions, keys, values)
        for layer in run:
            if ragged:
                layer.advance(T)
            layer.length = end_slot
        return out


def embed(model: PreTrainedModel, token_ids: torch.Tensor) -> torch.Tensor:
    return model.model.embed_tokens(token_ids)  # (B, T, H)


def head(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head: the same exit for every layer, as the LayerSkip recipe trains it."""
    return model.lm_head(model.model.norm(hidden)).float()  # (B, T, V)


def full_forward(model: PreTrainedModel, token_ids: torch.Tensor, cache: Cache, last_only: bool = False,
                 compiled: CompiledPasses | None = None) -> torch.Tensor:
    """Logits of the whole model (B, T, V), or of the last position only (B, 1, V)."""
    hidden = run_layers(model, embed(model, token_ids), cache, 0, num_layers(model), compiled)
    return head(model, hidden[:, -1:] if last_only else hidden)


def ragged_prefill(model: PreTrainedModel, token_ids: torch.Tensor, cache: RaggedCache, depth: int,
                   lengths: torch.Tensor) -> torch.Tensor:
    """Right-padded prompts (B, T) through layers [0, depth): the logits (B, V) after each row's last prompt token
    (lengths[b] of them). Afterwards every row holds its own prompt in the cache, the padding beyond it masked."""
    hidden = run_layers(model, embed(model, token_ids), cache, 0, depth)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), (lengths - 1).to(hidden.device)]  # (B, H)
    cache.set_row_lengths(lengths)
    return head(model, last[:, None])[:, 0]


@dataclass
class EarlyExit:
    logits: torch.Tensor  # (B, T, V) from the final norm and head applied at the exit layer
    hidden: torch.Tensor  # (B, T, H) the exit layer's output, kept for verification (the exit query cache)


def early_exit(
    model: PreTrainedModel, token_ids: torch.Tensor, cache: Cache, exit_layer: int, last_only: bool = False,
    compiled: CompiledPasses | None = None,
) -> EarlyExit:
    hidden = exit_hidden(model, token_ids, cache, exit_layer, compiled)
    return EarlyExit(head(model, hidden[:, -1:] if last_only else hidden), hidden)


def exit_hidden(model: PreTrainedModel, token_ids: torch.Tensor, cache: Cache, exit_layer: int,
                compiled: CompiledPasses | None = None) -> torch.Tensor:
    """Output of layers [0, exit_layer) without the head (B, T, H)."""
    return run_layers(model, embed(model, token_ids), cache, 0, exit_layer, compiled)


def remainder(model: PreTrainedModel, exit_hiddens: torch.Tensor, cache: Cache, exit_layer: int,
              compiled: CompiledPasses | None = None) -> torch.Tensor:
    """Full-model logits (B, T, V) from exit-layer hidden states: layers [exit_layer, L), norm, head."""
    return head(model, run_layers(model, exit_hiddens, cache, exit_layer, num_layers(model), compiled))


def rollback(cache: Cache, positions: int) -> None:
    """Forget the last `positions` entries of every layer (rejected drafts); they are overwritten next."""
    if positions:
        cache.crop(-positions)


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
