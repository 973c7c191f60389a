"""The KV cache: one transformers `Cache` for a batch of any size, each row with its own length.

A layer's buffers (B, heads, capacity, head_dim) are written by position: row b's T new positions go to
lengths[b]..lengths[b] + T - 1. Rejected drafts are rolled back by moving a row's length back, and the next
writes overwrite them; slots past a row's length hold padding or rejected drafts, which its mask hides.

The cache owns where a pass writes and what its queries see (`begin`, `mask`), so the layer runner never asks
which kind of batch it holds. While every row has the same length (always for one prompt), positions are shared
(T,) and a single new token needs no mask: the fast path of decoding one prompt, inside the cache rather than
beside it. Layers may hold different lengths while drafting (the first `exit_layer` layers run ahead of the
rest); the layers of one pass always hold the same, so a pass reads them from its first layer. Lengths live on
the host, where a pass is sized. Within a step every row advances alike (each pass writes T positions to every
row); rows drift apart only when a step keeps a different number of drafts per row. So how much more row b holds
than row 0 is the same in every layer: this `skew` (B,) lives on the device, and a ragged pass's positions are
row 0's length plus it. Nothing goes from the host to the device per pass (on a GPU, a blocking copy).
"""

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin


def upload(values: list, device: torch.device) -> torch.Tensor:
    """Host integers (a list, or a list of equal lists) on the device without waiting for it: on CUDA from pinned
    memory, asynchronously (a plain `torch.tensor(values, device=...)` is a blocking copy, a sync). The one way
    host data enters a generation: its prompts, their lengths, and which rows go on when some leave a batch."""
    return torch.tensor(values, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def unseen(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """The mask rule, for the eager and the compiled passes alike: (..., T, keys) True where the query at that
    position may not see the key at that position: causal, and within the sliding window if there is one.
    `queries` (T,) or (B, T)."""
    hidden = keys > queries[..., None]
    if window is not None:
        hidden |= keys <= queries[..., None] - window
    return hidden


def write_rows(buffers: tuple[torch.Tensor, torch.Tensor], states: tuple[torch.Tensor, torch.Tensor],
               slots: torch.Tensor) -> None:
    """The write rule of a batch whose rows hold different lengths, eager and compiled alike: row b's T new keys
    and values (B, heads, T, head_dim) into its positions `slots[b]` (B, T) of the buffers (B, heads, capacity,
    head_dim). One scatter per buffer: about half the time of an indexed assignment on the CPU."""
    index = slots[:, None, :, None].expand_as(states[0])
    for buffer, new in zip(buffers, states):
        buffer.scatter_(2, index, new)


def additive(hide: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return torch.zeros(hide.shape, dtype=hidden.dtype, device=hidden.device).masked_fill_(hide, float("-inf"))


def shared_mask(past: int, positions: torch.Tensor, window: int | None,
                hidden: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """The mask of queries at `positions` (T,) after `past` positions of every row, over the keys from the first
    one they can see (a sliding window's start) to the last written; None for a single query, which sees them all."""
    T = positions.shape[0]
    first = 0 if window is None else max(past + 1 - window, 0)
    if T == 1:
        return None, first
    return additive(unseen(positions, torch.arange(first, past + T, device=hidden.device), window), hidden), first


class KVLayer(CacheLayerMixin):
    """One layer's keys and values for B rows. Capacity grows (doubling) when a write would pass it, so a
    generation that outgrows its estimate reallocates O(log n) times."""

    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int, batch: int):
        super().__init__()
        self.capacity = capacity
        self.lengths = [0] * batch  # positions each row holds, on the host

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # zeros, not garbage: a compiled pass attends over the whole buffer with unwritten slots masked, and a
        # masked NaN would still poison the weighted sum
        shape = (len(self.lengths), key_states.shape[1], self.capacity, key_states.shape[3])
        self.keys, self.values = key_states.new_zeros(shape), value_states.new_zeros(shape)
        self.is_initialized = True

    @property
    def longest(self) -> int:
        return max(self.lengths)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, slots=None, **kwargs):
        """Write T new positions per row, at `slots` (B, T) when the rows' lengths differ; return the buffers up to
        the longest row."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T = key_states.shape[2]
        end = self.longest + T
        if end > self.keys.shape[2]:
            self.keys, self.values = (self._grown(t, end) for t in (self.keys, self.values))
        if slots is None:  # every row at one length
            start = self.lengths[0]
            self.keys.narrow(2, start, T).copy_(key_states)
            self.values.narrow(2, start, T).copy_(value_states)
        else:
            write_rows((self.keys, self.values), (key_states, value_states), slots)
        self.lengths = [length + T for length in self.lengths]
        return self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end)

    def _grown(self, buffer: torch.Tensor, needed: int) -> torch.Tensor:
        bigger = buffer.new_zeros((*buffer.shape[:2], max(needed, 2 * buffer.shape[2]), buffer.shape[3]))
        bigger[:, :, : self.longest] = buffer[:, :, : self.longest]
        return bigger

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.longest + query_length, 0

    def get_seq_length(self) -> int:
        return self.longest

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove positions of every row (transformers' convention: a negative count)."""
        self.lengths = [max(length + min(tokens_to_remove, 0), 0) for length in self.lengths]

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)


class KVCache(Cache):
    """The cache of B rows (one prompt: B = 1), shared by drafting and verification."""

    def __init__(self, capacity: int = 256, batch: int = 1):
        super().__init__(layer_class_to_replicate=lambda: KVLayer(capacity, self.batch))
        self.batch = batch
        self.past: list[int] = []  # the rows' lengths where the running pass began
        self.slots: torch.Tensor | None = None  # (B, T) where it writes, when those lengths differ
        self.skew: torch.Tensor | None = None  # (B,) on the device: row b's length less row 0's; None: all alike

    def lengths(self, layer: int) -> list[int]:
        """What each row holds in `layer` (zeros before the layer's first pass)."""
        return self.layers[layer].lengths if layer < len(self.layers) else [0] * self.batch

    def begin(self, start: int, T: int, device: torch.device, ragged: bool = False) -> torch.Tensor:
        """Start a pass of T new tokens per row through layers from `start`; its positions: (T,), shared by every
        row, when they hold one length (unless `ragged`, which a compiled batch asks for to keep one graph as its
        rows part), else (B, T)."""
        self.past = list(self.lengths(start))
        if not ragged and len(set(self.past)) == 1:
            self.slots = None
            return torch.arange(self.past[0], self.past[0] + T, device=device)
        row0 = torch.arange(self.past[0], self.past[0] + T, device=device)
        self.slots = row0.expand(self.batch, T).contiguous() if self.skew is None else row0 + self.skew[:, None]
        return self.slots

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx, slots=self.slots)

    def reset(self) -> None:
        super().reset()
        self.skew = None

    def mask(self, positions: torch.Tensor, window: int | None,
             hidden: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """What the running pass's queries at `positions` see of the keys its layers return (up to the longest
        row after the write), and the first key worth attending over (a sliding window's start). The mask is
        additive (cheaper for SDPA on the CPU than a boolean one): (T, keys) for shared positions, (B, 1, T,
        keys) for ragged ones; None for one new token at shared positions, which sees every key it is given."""
        if self.slots is None:
            return shared_mask(self.past[0], positions, window, hidden)
        keys = torch.arange(max(self.past) + positions.shape[-1], device=hidden.device)
        return additive(unseen(positions, keys, window), hidden)[:, None], 0

    def wrote(self, start: int, end: int, T: int) -> None:
        """Layers [start, end) hold T more positions per row: a compiled pass wrote them into the buffers."""
        for layer in self.layers[start:end]:
            layer.lengths = [length + T for length in layer.lengths]

    def set_row_lengths(self, lengths: list[int]) -> None:
        """After a right-padded prefill: row b holds lengths[b] real positions in every layer."""
        for layer in self.layers:
            layer.lengths = list(lengths)
        skew = [length - lengths[0] for length in lengths]
        self.skew = upload(skew, self.layers[0].keys.device) if any(skew) else None

    def rollback(self, counts: list[int], on_device: torch.Tensor | None = None) -> None:
        """Forget the last counts[b] positions of row b in every layer (its rejected drafts); `on_device`: the
        same counts (B,) where the device has them already, else they are uploaded if rows come to differ."""
        if any(counts):
            for layer in self.layers:
                layer.lengths = [length - count for length, count in zip(layer.lengths, counts)]
            if len(set(counts)) > 1:
                counts = upload(counts, self.layers[0].keys.device) if on_device is None else on_device
                self.skew = (0 if self.skew is None else self.skew) - (counts - counts[:1])

    def keep_rows(self, rows: list[int], index: torch.Tensor) -> None:
        """Drop every row not in `rows` (finished ones), so that passes no longer compute them; `index`: `rows` on
        the device (`upload`)."""
        for layer in self.layers:
            layer.lengths = [layer.lengths[b] for b in rows]
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        if self.skew is not None:
            skew = self.skew.index_select(0, index)
            self.skew = skew - skew[:1]
        self.batch = len(rows)


def new_cache(capacity: int = 256, batch: int = 1) -> KVCache:
    return KVCache(capacity, batch)


def cache_bytes(cache: KVCache) -> int:
    """What the cache holds: the keys and values of every row's positions in every layer (not the capacity
    allocated for them, which depends on the budget and the draft length rather than on what was decoded)."""
    return sum(2 * sum(layer.lengths) * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
               for layer in cache.layers if layer.is_initialized)
