"""The layer runner: one loop over decoder layers, eager and compiled alike, and the passes decoding makes of it.

`layer_pass` computes each decoder layer from the layer's own weights with a handful of tensor operations
(RMSNorm, projections, rotary, SDPA, gated MLP) instead of calling the layer module: on a small model a decoded
token's time is mostly per-operation overhead, and the module path spends about twice as many operations. The
cache's `Pass` it is given writes the keys and values and says what the queries see: eagerly up to the pass's
last position, compiled over the whole buffers (compiled.py wraps this same function); in training, nothing is
kept.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .cache import KVCache, attention_mask, upload
from .weights import LayerWeights, Weights, joined


def rotary(model: PreTrainedModel, hidden: torch.Tensor, positions: torch.Tensor,
           table: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (1 or B, T, 1, head_dim) for `positions` (T,) or (B, T), with the sign of rotate_half folded
    into sin: gathered from `table` (`rotary_table`) where there is one, else from the model's rotary module."""
    positions = positions if positions.dim() == 2 else positions.unsqueeze(0)
    if table is not None:  # positions past the context are a batch's unused slots (drafted beside other rows)
        positions = positions.clamp_max(table[0].shape[0] - 1)
        return table[0][positions].unsqueeze(2), table[1][positions].unsqueeze(2)
    cos, sin = model.model.rotary_emb(hidden, positions)
    half = sin.shape[-1] // 2
    return cos.unsqueeze(2), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(2)


def rotary_table(model: PreTrainedModel, device: torch.device, dtype: torch.dtype,
                 length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`rotary`'s cos and sin (length, head_dim) for positions [0, length), from the model's own rotary module:
    the same numbers (each is a position times a frequency, computed alone), in two index operations per pass
    instead of about ten. None where the module's frequencies change with the sequence's length (dynamic and
    long-context scaling): those are computed per pass."""
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        return None
    cos, sin = rotary(model, torch.empty(0, dtype=dtype, device=device), torch.arange(length, device=device))
    return cos[0, :, 0], sin[0, :, 0]


def _layer(w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv, index: int,
           masks: dict) -> torch.Tensor:
    """One decoder layer over x (B, T, H), the same maths as transformers' Llama layer."""
    B, T, _ = x.shape
    h = torch.rms_norm(x, x.shape[-1:], w.attn_norm, w.attn_eps)
    qkv = F.linear(h, *(w.qkv or joined(w.qkv_parts))).view(B, T, w.heads + 2 * w.kv_heads, w.head_dim)
    qk, v = torch.split_with_sizes(qkv, (w.heads + w.kv_heads, w.kv_heads), dim=2)  # not Tensor.split: slower
    # rotary: x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) done as a swap of halves and a
    # sign folded into `sin` once per pass
    swapped = qk.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    q, k = torch.split_with_sizes(torch.addcmul(qk * cos, swapped, sin).transpose(1, 2), (w.heads, w.kv_heads), dim=1)
    k, v = kv.update(k, v.transpose(1, 2), index)  # (B, heads, keys, head_dim)
    mask, first = masks[w.window]
    if first:
        k, v = k[:, :, first:], v[:, :, first:]
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=w.scale, enable_gqa=w.heads != w.kv_heads)
    x = x + F.linear(attn.transpose(1, 2).reshape(B, T, -1), *w.o)
    h = torch.rms_norm(x, x.shape[-1:], w.mlp_norm, w.mlp_eps)
    gate, up = F.linear(h, *(w.gate_up or joined(w.gate_up_parts))).chunk(2, dim=-1)
    return x + F.linear(w.act(gate) * up, *w.down)


def layer_pass(model: PreTrainedModel, weights: tuple[LayerWeights, ...], start: int, hidden: torch.Tensor,
               positions: torch.Tensor, kv, table=None) -> torch.Tensor:
    """The one layer loop: layers `weights` (the first is layer `start`) over `hidden` (B, T, H) at `positions`,
    (T,) shared by every row or (B, T); `kv` writes each layer's keys and values (`update`) and says what the
    queries see (`mask`); `table`: the model's `rotary_table`, if it has one."""
    cos, sin = rotary(model, hidden, positions, table)
    masks = {window: kv.mask(positions, window, hidden) for window in {w.window for w in weights}}
    for index, w in enumerate(weights, start):
        if w.attn_norm.device != hidden.device:  # a model spread over devices (--device_map)
            hidden, cos, sin = (t.to(w.attn_norm.device) for t in (hidden, cos, sin))
            masks = {k: (m if m is None else m.to(hidden.device), first) for k, (m, first) in masks.items()}
        hidden = _layer(w, hidden, cos, sin, kv, index, masks)
    return hidden


class _Uncached:
    """A whole sequence from position 0 without a cache (training, scoring): nothing is kept."""

    def update(self, keys: torch.Tensor, values: torch.Tensor, index: int):
        return keys, values

    def mask(self, positions, window, hidden):
        return attention_mask(positions, positions.shape[0], window, hidden)


@dataclass
class EarlyExit:
    logits: torch.Tensor  # (B, T, V) from the final norm and head applied at the exit layer
    hidden: torch.Tensor  # (B, T, H) the exit layer's output, kept for verification (the exit query cache)


class Decoder:
    """A model's decoder as the runner computes it: the model and its layers' weights (`Weights`, rebuilt when the
    model is moved or cast), and the passes decoding makes. Whoever decodes holds one (a Generator, a PassTimer);
    passes given `compiled` (a `CompiledPasses` over this decoder) run compiled where it holds their shape."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.weights = Weights(model)
        self.tables: dict[tuple[torch.device, torch.dtype], tuple | None] = {}  # `rotary_table`s by where they are

    def rotary_table(self, hidden: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The model's `rotary_table` on `hidden`'s device and in its dtype for at least `length` positions, made on
        first use and again, twice as long, when a pass needs more."""
        key = (hidden.device, hidden.dtype)
        table = self.tables.get(key)
        if key not in self.tables or table is not None and table[0].shape[0] < length:
            self.tables[key] = rotary_table(self.model, *key, max(length, 2 * table[0].shape[0] if table else 0))
        return self.tables[key]

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def vocab_size(self) -> int:
        """The head's outputs: the last dimension of the logits."""
        return self.model.lm_head.weight.shape[0]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(token_ids)  # (B, T, H)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: the same exit for every layer, as the LayerSkip recipe trains it."""
        return self.model.lm_head(self.model.model.norm(hidden)).float()  # (B, T, V)

    def run_layers(self, hidden: torch.Tensor, cache: KVCache | None, start: int, end: int, compiled=None,
                   offset: int = 0) -> torch.Tensor:
        """Layers [start, end) over `hidden` (B, T, H), `offset` positions past what each row of the cache holds
        (drafting: the drafts before this one); their keys and values are written there, and kept once the step
        commits them. Without a cache the sequence starts at position 0."""
        if cache is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            return layer_pass(self.model, self.weights(start, end), start, hidden, positions, _Uncached())
        if compiled is not None and (out := compiled.run(hidden, cache, start, end, offset)) is not None:
            return out
        kv = cache.pass_over(end, offset, hidden.shape[1], hidden.device)
        return layer_pass(self.model, self.weights(start, end), start, hidden, kv.positions, kv,
                          self.rotary_table(hidden, kv.seen))

    def full_forward(self, token_ids: torch.Tensor, cache: KVCache | None, last_only: bool = False,
                     compiled=None) -> torch.Tensor:
        """Logits of the whole model (B, T, V), or of the last position only (B, 1, V)."""
        hidden = self.run_layers(self.embed(token_ids), cache, 0, self.num_layers, compiled)
        return self.head(hidden[:, -1:] if last_only else hidden)

    def exit_hidden(self, token_ids: torch.Tensor, cache: KVCache | None, exit_layer: int, compiled=None,
                    offset: int = 0) -> torch.Tensor:
        """Output of layers [0, exit_layer) without the head (B, T, H)."""
        return self.run_layers(self.embed(token_ids), cache, 0, exit_layer, compiled, offset)

    def early_exit(self, token_ids: torch.Tensor, cache: KVCache | None, exit_layer: int, last_only: bool = False,
                   compiled=None, offset: int = 0) -> EarlyExit:
        hidden = self.exit_hidden(token_ids, cache, exit_layer, compiled, offset)
        return EarlyExit(self.head(hidden[:, -1:] if last_only else hidden), hidden)

    def remainder(self, exit_hiddens: torch.Tensor, cache: KVCache, exit_layer: int, compiled=None) -> torch.Tensor:
        """Full-model logits (B, T, V) from exit-layer hidden states: layers [exit_layer, L), norm, head."""
        return self.head(self.run_layers(exit_hiddens, cache, exit_layer, self.num_layers, compiled))

    def prefill(self, token_ids: torch.Tensor, cache: KVCache, depth: int, lengths: list[int]) -> torch.Tensor:
        """Right-padded prompts (B, T) through layers [0, depth): the logits (B, V) after each row's last prompt
        token (lengths[b] of them). Afterwards every row holds its own prompt, the padding beyond it masked."""
        hidden = self.run_layers(self.embed(token_ids), cache, 0, depth)
        held = upload(lengths, hidden.device)
        cache.commit(lengths, held)
        return self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), held - 1][:, None])[:, 0]


# For a single pass outside decoding (training, analysis, tests): a Decoder made for the call.

def run_layers(model: PreTrainedModel, hidden: torch.Tensor, cache: KVCache | None, start: int,
               end: int) -> torch.Tensor:
    return Decoder(model).run_layers(hidden, cache, start, end)


def full_forward(model: PreTrainedModel, token_ids: torch.Tensor, cache: KVCache | None,
                 last_only: bool = False) -> torch.Tensor:
    """With a cache, which keeps every position the pass wrote: a sequence can be run in pieces."""
    logits = Decoder(model).full_forward(token_ids, cache, last_only)
    if cache is not None:
        cache.commit([token_ids.shape[1]] * token_ids.shape[0])
    return logits


def early_exit(model: PreTrainedModel, token_ids: torch.Tensor, cache: KVCache | None, exit_layer: int,
               last_only: bool = False) -> EarlyExit:
    return Decoder(model).early_exit(token_ids, cache, exit_layer, last_only)


def embed(model: PreTrainedModel, token_ids: torch.Tensor) -> torch.Tensor:
    return Decoder(model).embed(token_ids)


def head(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    return Decoder(model).head(hidden)
