"""The KV cache: each layer's keys and values for a batch of any size, written where the caller says.

A layer's buffers (B, heads, capacity, head_dim) are written by position, gpt-fast's way: a pass writes row b's T
new tokens at `positions` (the row's length plus an offset within the step: drafting runs the first layers ahead of
the others), and a step ends by committing how many of the positions it wrote each row keeps (`commit`). What it
does not keep (rejected drafts) stays where it is, hidden by the mask (a query sees keys at positions up to its
own), until the next step overwrites it. Nothing is rolled back and no layer counts what it holds.

Each row's length lives on the device (`lengths`, (B,)), where a batch's positions are made, and on the host
(`held`), mirrored from the step's one read, where an eager pass is sized; nothing goes from the host to the device
per pass (on a GPU, a blocking copy). While every row holds as many positions (always for one prompt) positions
are shared, (T,), made from the host's numbers, and a single new token needs no mask: the fast path of decoding one
prompt, inside the cache rather than beside it.

Eager and compiled passes run the same write and mask rules (`Pass`); they differ only in how many keys they attend
over: an eager pass up to its last position, a compiled one the whole buffer, so that one graph serves every step.
This is not a transformers `Cache`: no transformers code calls it, and a cache whose lengths the caller keeps on
the device does not fit that interface's (each layer counting what it holds).
"""

import torch


def upload(values: list, device: torch.device) -> torch.Tensor:
    """Host integers (a list, or a list of equal lists) on the device without waiting for it: on CUDA from pinned
    memory, asynchronously (a plain `torch.tensor(values, device=...)` is a blocking copy, a sync). The one way
    host data enters a generation: its prompts, their lengths, and which rows go on when some leave a batch."""
    return torch.tensor(values, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def unseen(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """(..., T, keys) True where the query at that position may not see the key at that position: causal, and
    within the sliding window if there is one. `queries` (T,) or (B, T)."""
    hidden = keys > queries[..., None]
    if window is not None:
        hidden |= keys <= queries[..., None] - window
    return hidden


def attention_mask(positions: torch.Tensor, seen: int, window: int | None, hidden: torch.Tensor,
                   exact: bool = True) -> tuple[torch.Tensor | None, int]:
    """The mask rule: what queries at `positions` (T,) or (B, T) see of the first `seen` keys, as an additive mask
    (cheaper for SDPA on the CPU than a boolean one), (T, keys) or (B, 1, T, keys), from the first key worth
    attending over (a sliding window's start, for shared positions). `exact`: the last key is the last query's own
    (an eager pass), so one query at shared positions sees every key and needs no mask."""
    T, shared = positions.shape[-1], positions.dim() == 1
    first = max(seen - T + 1 - window, 0) if exact and shared and window is not None else 0
    if exact and shared and T == 1:
        return None, first
    mask = unseen(positions, torch.arange(first, seen, device=hidden.device), window)
    mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill_(mask, float("-inf"))
    return (mask if shared else mask[:, None]), first


class Pass:
    """What one pass of `runner.layer_pass` does with the cache: writes each layer's new keys and values at
    `positions` (the write rule), hands back the keys its queries attend over, and masks those they may not see.
    `keys`, `values`: the buffers by layer index (a cache's own lists, or the buffers given to a compiled pass,
    None before its first layer). `seen`: how many keys an eager pass attends over, its buffers made or grown to
    hold them; None: a compiled pass, over the whole buffers."""

    def __init__(self, keys: list, values: list, positions: torch.Tensor, seen: int | None = None,
                 capacity: int = 0):
        self.keys, self.values, self.positions, self.seen = keys, values, positions, seen
        self.capacity = capacity  # a new buffer's least capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, index: int):
        """Write T new positions per row (key_states, value_states (B, heads, T, head_dim)); return the keys and
        values (B, heads, keys, head_dim) the queries attend over."""
        if self.seen is not None and (self.keys[index] is None or self.keys[index].shape[2] < self.seen):
            self._make_room(index, key_states, value_states)
        keys, values = self.keys[index], self.values[index]
        positions = self.positions if self.positions.device == keys.device else self.positions.to(keys.device)
        if positions.dim() == 1:  # every row at the same positions
            keys.index_copy_(2, positions, key_states)
            values.index_copy_(2, positions, value_states)
        else:  # row b at positions[b] (B, T): one scatter per buffer
            slots = positions[:, None, :, None].expand_as(key_states)
            keys.scatter_(2, slots, key_states)
            values.scatter_(2, slots, value_states)
        if self.seen is None:
            return keys, values
        return keys.narrow(2, 0, self.seen), values.narrow(2, 0, self.seen)

    def mask(self, positions: torch.Tensor, window: int | None, hidden: torch.Tensor):
        if self.seen is None:
            return attention_mask(positions, self.keys[-1].shape[2], window, hidden, exact=False)
        return attention_mask(positions, self.seen, window, hidden)

    def _make_room(self, index: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """A layer's buffers made on its first write (zeros, not garbage: a compiled pass attends over unwritten
        slots, masked, and a masked NaN would still poison the weighted sum), or doubled when full (O(log n)
        reallocations for a generation that outgrows its estimate)."""
        for buffers, new in ((self.keys, key_states), (self.values, value_states)):
            old = buffers[index]
            capacity = self.seen if old is None else max(self.seen, 2 * old.shape[2])
            buffers[index] = new.new_zeros((*new.shape[:2], max(capacity, self.capacity), new.shape[3]))
            if old is not None:
                buffers[index][:, :, : old.shape[2]] = old


class KVCache:
    """The keys and values of B rows (one prompt: B = 1) in every layer, shared by drafting and verification, and
    how many positions each row holds: `lengths` on the device, `held` on the host."""

    def __init__(self, capacity: int = 256, batch: int = 1):
        self.capacity = capacity  # a layer's buffers' capacity when made
        self.keys: list[torch.Tensor | None] = []  # by layer: (B, kv_heads, capacity, head_dim), made on first use
        self.values: list[torch.Tensor | None] = []
        self.held = [0] * batch
        self.lengths: torch.Tensor | None = None  # (B,) on the device, from the first commit

    @property
    def batch(self) -> int:
        return len(self.held)

    def positions(self, offset: int, T: int, device: torch.device, ragged: bool = False) -> torch.Tensor:
        """Where a pass of T new tokens per row writes, `offset` positions past what each row holds: (T,), shared
        by every row, while they hold one length (unless `ragged`, which a compiled batch asks for to keep one
        graph as its rows part), else (B, T)."""
        if not ragged and len(set(self.held)) == 1:
            return torch.arange(self.held[0] + offset, self.held[0] + offset + T, device=device)
        steps = torch.arange(offset, offset + T, device=device)
        return steps.expand(self.batch, T) + (0 if self.lengths is None else self.lengths[:, None])

    def pass_over(self, end: int, offset: int, T: int, device: torch.device) -> Pass:
        """An eager pass of T new tokens per row, `offset` past what each row holds, through layers up to `end`:
        it attends over every key up to the last position it writes."""
        missing = end - len(self.keys)
        self.keys += [None] * missing
        self.values += [None] * missing
        return Pass(self.keys, self.values, self.positions(offset, T, device), max(self.held) + offset + T,
                    self.capacity)

    def has_room(self, start: int, end: int, last: int) -> bool:
        """Whether layers [start, end) have buffers that hold `last` positions per row (a compiled pass cannot make
        or grow them)."""
        return (len(self.keys) >= end and all(k is not None for k in self.keys[start:end])
                and self.keys[start].shape[2] >= last)

    def commit(self, counts: list[int], on_device: torch.Tensor | None = None) -> None:
        """Row b keeps counts[b] more positions (its prompt; a step's accepted drafts and the token after them);
        `on_device`: the same counts (B,) where the device has them already, else they are uploaded if they
        differ between rows."""
        if self.lengths is None:
            self.lengths = torch.zeros(self.batch, dtype=torch.long, device=self._device())
        self.held = [length + count for length, count in zip(self.held, counts)]
        if len(set(counts)) == 1:
            self.lengths += counts[0]
        else:
            self.lengths += upload(counts, self.lengths.device) if on_device is None else on_device

    def _device(self) -> torch.device:
        return next(k.device for k in self.keys if k is not None)

    def keep_rows(self, rows: list[int], index: torch.Tensor) -> None:
        """Drop every row not in `rows` (finished ones), so that passes no longer compute them; `index`: `rows` on
        the device (`upload`)."""
        self.held = [self.held[b] for b in rows]
        for buffers in (self.keys, self.values):
            buffers[:] = [b if b is None else b.index_select(0, index) for b in buffers]
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, index)

    def reset(self) -> None:
        """Empty, its buffers kept where they are (what they hold is hidden until overwritten)."""
        self.held, self.lengths = [0] * self.batch, None


def new_cache(capacity: int = 256, batch: int = 1) -> KVCache:
    return KVCache(capacity, batch)


def cache_bytes(cache: KVCache) -> int:
    """What the cache holds: the keys and values of every row's positions in every layer (not the capacity
    allocated for them, which depends on the budget and the draft length rather than on what was decoded)."""
    return sum(2 * sum(cache.held) * keys.shape[1] * keys.shape[3] * keys.element_size()
               for keys in cache.keys if keys is not None)
