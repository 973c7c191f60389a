"""Compiled passes: `runner.layer_pass` through torch.compile, over a cache's whole buffers.

A pass compiled for (start, end, T) writes at positions given as a device tensor and attends over its layers'
whole buffers with what is not written yet masked (through the cache's `Pass`, as an eager pass does), so it reads
nothing back from the device and one compilation serves every step; for a batch, the batch size is marked dynamic,
so one compilation serves every batch size from 2 as rows leave.

On the CPU the buffer length is marked dynamic too (one compilation for every cache capacity) and the compiled
code calls its kernels through a C++ wrapper (less Python per call). On CUDA a pass runs as a CUDA graph
(`mode="reduce-overhead"`): a graph replays its kernels at fixed addresses, so the cache's buffers are static
inputs (`mark_static_address`), their capacity a fixed bucket per generation (`capacity_bucket`) and, reused
from one generation to the next by the generator, recorded once; a graph's output is copied out of the graph's
memory before the next replay overwrites it.
"""

import types
from collections.abc import Iterable

import torch

from .cache import KVCache, Pass
from .runner import Decoder, layer_pass


def _pass_over_buffers(model, weights: tuple, start: int, table):
    """The function a compiled pass runs: `layer_pass` of layers `weights` (from `start`) over a cache's whole
    buffers (the same `Pass` an eager one writes through), as a function with a code object of its own. Dynamo
    keeps compiled code and counts recompilations against its limit per code object: passes sharing one (as
    partials of one function do) would share one cache and one limit, and with fullgraph=True reaching it is an
    error. With its own, a pass compiles once per shape of its inputs."""
    before = [None] * start

    def run(hidden, positions, keys, values):
        kv = Pass(before + keys, before + values, positions)
        return layer_pass(model, weights, start, hidden, positions, kv, table)

    return types.FunctionType(run.__code__.replace(), run.__globals__, run.__name__, None, run.__closure__)


class _CompiledPass:
    """One pass through torch.compile: `layer_pass` over the buffers of layers [start, end)."""

    def __init__(self, decoder: Decoder, start: int, end: int, graphs: bool, table):
        run = _pass_over_buffers(decoder.model, tuple(decoder.weights(start, end)), start, table)
        if graphs and table is not None:  # read in place, not copied into the graph's memory at every replay
            for t in table:
                torch._dynamo.mark_static_address(t)
        # dynamic=False: only the sizes marked dynamic vary. Dynamo's inference of the others keeps a profile per
        # function name and line, on disk across processes, which every pass's copy shares: a head count differing
        # between two models' passes would be taken for a dynamic size
        if graphs:
            self.run = torch.compile(run, fullgraph=True, dynamic=False, mode="reduce-overhead")
        else:
            self.run = torch.compile(run, fullgraph=True, dynamic=False,
                                     options={"cpp_wrapper": decoder.device.type == "cpu"})
        self.graphs = graphs

    def __call__(self, *args) -> torch.Tensor:
        if self.graphs:  # each call is a step of its own: what earlier replays returned has been copied out
            torch.compiler.cudagraph_mark_step_begin()
        out = self.run(*args)
        return out.clone() if self.graphs else out


def capacity_bucket(positions: int) -> int:
    """The cache capacity a CUDA-graph generation allocates for `positions`: the next power of two from 256, so
    that generations of similar lengths share buffers and graphs."""
    return max(256, 1 << (positions - 1).bit_length())


def graph_cache(caches: dict, capacity: int, rows: int) -> KVCache:
    """With CUDA graphs: the cache of `rows` rows and `capacity`'s bucket kept in `caches` (its buffers are where
    the graphs were recorded, so reusing it replays them; new buffers would record them again), emptied; made
    on first use."""
    key = (rows, capacity_bucket(capacity))
    if key in caches:
        caches[key].reset()
    else:
        caches[key] = KVCache(key[1], rows)
    return caches[key]


class CompiledPasses:
    """The passes a decoder runs through torch.compile, (start layer, end layer, new tokens), each compiled on its
    first use. Whoever runs the passes holds this object (a Generator, a PassTimer): compiled code lives as long as
    its holder, and a new holder compiles for its own model."""

    def __init__(self, decoder: Decoder, shapes: Iterable[tuple[int, int, int]]):
        self.decoder = decoder
        self.shapes = frozenset(shapes)
        self.graphs = decoder.device.type == "cuda"  # CUDA graphs: static buffers, fixed capacities
        self.passes: dict[tuple[int, int, int, bool], _CompiledPass] = {}  # (start, end, T, batch) -> its pass

    @property
    def shapes_run(self) -> set[tuple[int, int, int]]:
        """The shapes (start layer, end layer, new tokens) that have run compiled."""
        return {key[:3] for key in self.passes}

    def run(self, hidden: torch.Tensor, cache: KVCache, start: int, end: int, offset: int) -> torch.Tensor | None:
        """The pass over `hidden` (B, T, H) compiled, `offset` positions past what each row holds, or None where
        this shape is not compiled or cannot run yet (the first pass makes the cache's buffers; a full buffer would
        have to grow): the caller then runs the layers op by op."""
        B, T = hidden.shape[:2]
        if (start, end, T) not in self.shapes or not cache.has_room(start, end, max(cache.held) + offset + T):
            return None
        many = B > 1  # a batch always at (B, T) positions: one compilation whether its rows' lengths agree or not
        positions = cache.positions(offset, T, hidden.device, ragged=many)
        keys, values = cache.keys[start:end], cache.values[start:end]
        if not any(hasattr(keys[0], mark) for mark in ("_dynamo_dynamic_indices", "_dynamo_static_input_type")):
            for buffer in keys + values:
                if self.graphs:
                    torch._dynamo.mark_static_address(buffer)  # replayed in place; a new buffer re-records
                else:
                    torch._dynamo.mark_dynamic(buffer, 2)  # the capacity: one compilation for every cache size
                if many:
                    torch._dynamo.mark_dynamic(buffer, 0)
        if many:
            torch._dynamo.mark_dynamic(hidden, 0)
            torch._dynamo.mark_dynamic(positions, 0)
        key = (start, end, T, many)
        if key not in self.passes:
            # the table of the whole context: the compiled code keeps it, whatever the positions it later meets
            context = getattr(self.decoder.model.config, "max_position_embeddings", None)
            table = None if context is None else self.decoder.rotary_table(hidden, context)
            self.passes[key] = _CompiledPass(self.decoder, start, end, self.graphs, table)
        return self.passes[key](hidden, positions, keys, values)
