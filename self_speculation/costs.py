"""What the passes of decoding cost on this machine: the numbers every strategy's cost model reads, and the timer
that measures them."""

import statistics
import time
from dataclasses import dataclass

import torch

from . import layers


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def typical_context(prompt_lengths: list[int], budget: int) -> int:
    """Where pass costs are measured: the cache a typical step attends over, half way through a generation of
    `budget` tokens after the median prompt."""
    return int(statistics.median(prompt_lengths)) + budget // 2


@dataclass
class PassCosts:
    """Seconds, measured here, of the passes decoding makes: layers [0, E) over one position (`draft`), layers
    [E, L) over T positions (`verify`, T -> seconds), all layers over one position (`full`), and the final norm and
    head over T positions (`head`)."""

    draft: float
    verify: dict[int, float]
    full: float
    head: dict[int, float]

    @classmethod
    def from_dict(cls, saved: dict) -> "PassCosts":
        """The inverse of `dataclasses.asdict` after a JSON round trip (whose keys are strings)."""
        return cls(saved["draft"], {int(k): v for k, v in saved["verify"].items()}, saved["full"],
                   {int(k): v for k, v in saved["head"].items()})

    @staticmethod
    def at(table: dict[int, float], positions: float) -> float:
        """Linear interpolation for a mean number of positions."""
        low = int(positions)
        high = min(low + 1, max(table))
        return table[low] + (positions - low) * (table[high] - table[low])


class PassTimer:
    """Times passes of layers over a cache holding `context` positions, as decoding runs them (through
    torch.compile for the `compiled` shapes); every pass is rolled back after it, so the context stays put."""

    def __init__(self, model, context: int, max_positions: int, compiled=(), repeats: int = 15):
        self.decoder, self.repeats = layers.Decoder(model), repeats
        self.device = self.decoder.device
        self.cache = layers.new_cache(context + max_positions)
        self.compiled = layers.CompiledPasses(self.decoder, compiled)
        with torch.inference_mode():
            self.decoder.full_forward(torch.zeros((1, context), dtype=torch.long, device=self.device), self.cache)

    @torch.inference_mode()
    def median_time(self, start: int, end: int, positions: int, with_head: bool = False) -> tuple[float, float]:
        """Median seconds of the layers [start, end) over `positions` new positions, and of the head after them."""
        hidden = self.decoder.embed(torch.zeros((1, positions), dtype=torch.long, device=self.device))
        times = []
        for _ in range(self.repeats + 2):  # the first two warm up
            sync_device(self.device)
            begin = time.perf_counter()
            out = self.decoder.run_layers(hidden, self.cache, start, end, self.compiled)
            sync_device(self.device)
            middle = time.perf_counter()
            if with_head:
                self.decoder.head(out)
                sync_device(self.device)
            times.append((middle - begin, time.perf_counter() - middle))
            for layer in self.cache.layers[start:end]:
                layer.crop(-positions)
        return tuple(statistics.median(t[i] for t in times[2:]) for i in (0, 1))

    def costs(self, exit_layer: int, max_positions: int, full: float | None = None) -> PassCosts:
        """The passes of self-speculation at `exit_layer`; `full` reuses a full pass timed before."""
        count = self.decoder.num_layers
        verify, head = {}, {}
        for positions in range(1, max_positions + 1):
            verify[positions], head[positions] = self.median_time(exit_layer, count, positions, with_head=True)
        draft = self.median_time(0, exit_layer, 1)[0]
        return PassCosts(draft, verify, self.median_time(0, count, 1)[0] if full is None else full, head)


def measure_pass_costs(model, context: int, exit_layer: int, max_positions: int, compiled: bool = False,
                       repeats: int = 15) -> "PassCosts":
    """Median times of the passes of `PassCosts` after `context` cached positions, run as decoding runs them
    (through torch.compile for the compiled shapes when `compiled`)."""
    count = layers.num_layers(model)
    passes = {(0, exit_layer, 1), (exit_layer, count, max_positions), (0, count, 1)} if compiled else ()
    return PassTimer(model, context, max_positions, passes, repeats).costs(exit_layer, max_positions)
