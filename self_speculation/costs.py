"""What the passes of decoding cost on this machine: the numbers every strategy's cost model reads, and the timer
that measures them."""

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

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
        """Linear interpolation for a mean number of positions; past the longest timed, the last two's slope."""
        last = max(table)
        low = min(int(positions), last - 1) if last > 1 else last
        high = min(low + 1, last)
        return table[low] + (positions - low) * (table[high] - table[low])


class PassTimer:
    """Times passes of layers over a cache of `rows` rows holding about `context` positions each (a batch's rows
    one apart, so that its passes take the ragged path a decoded batch's take), as decoding runs them
    (through `compiled`, a `CompiledPasses` over the same decoder, where it holds their shape); no pass is
    committed, so the context stays put."""

    def __init__(self, decoder: layers.Decoder, context: int, max_positions: int,
                 compiled: layers.CompiledPasses | None = None, rows: int = 1, repeats: int = 15, new_cache=None):
        """`new_cache(capacity, rows)`: where the cache comes from (a generator's `new_cache`, so that CUDA graphs
        replay over the buffers they were recorded with); by default a new one."""
        self.decoder, self.compiled, self.rows, self.repeats = decoder, compiled, rows, repeats
        self.device = decoder.device
        self.cache = (new_cache or layers.new_cache)(context + max_positions, rows)
        with torch.inference_mode():
            self.decoder.full_forward(self.tokens(context), self.cache)
        # the rows of a decoded batch hold different lengths: its passes take the ragged path
        self.cache.commit([context - b % 2 for b in range(rows)])

    def tokens(self, positions: int) -> torch.Tensor:
        return torch.zeros((self.rows, positions), dtype=torch.long, device=self.device)

    def once(self, start: int, end: int, hidden: torch.Tensor, with_head: bool) -> tuple[float, float]:
        """Seconds of one run of the layers [start, end) over `hidden` (rows, positions, H), and of the head after
        them (0 without it); the cache keeps none of it. On CUDA by events on the device's own clock (one
        sync, at the end), elsewhere by the host's clock after each part."""
        marks = [self.mark()]
        out = self.decoder.run_layers(hidden, self.cache, start, end, self.compiled)
        marks.append(self.mark())
        if with_head:
            self.decoder.head(out)
        marks.append(self.mark())
        if self.device.type == "cuda":
            marks[-1].synchronize()
            return marks[0].elapsed_time(marks[1]) / 1000, marks[1].elapsed_time(marks[2]) / 1000
        return marks[1] - marks[0], marks[2] - marks[1]

    def mark(self):
        """Now: a recorded CUDA event on a GPU, else the host's clock once the device is done."""
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        sync_device(self.device)
        return time.perf_counter()

    @torch.inference_mode()
    def samples(self, exit_layers: tuple[int, ...], max_positions: int, progress: str | None = None) -> dict:
        """Every timed run of the passes of `PassCosts` at each of `exit_layers` (none: the full pass and the head
        only), in rounds of one run of each pass, so that the machine's slow moments fall on every pass alike and
        cancel in their ratios (the ideal speedup is one) and in the comparison of exit layers; the first two
        rounds warm up; `progress` names a progress bar over the rounds. Keys: ("full",), ("draft", E),
        ("verify", E, T), ("head", T)."""
        count = self.decoder.num_layers
        passes = [(("full",), 0, count, 1)]
        for exit_layer in exit_layers:
            passes += [(("draft", exit_layer), 0, exit_layer, 1)]
            passes += [(("verify", exit_layer, t), exit_layer, count, t) for t in range(1, max_positions + 1)]
        hiddens = {t: self.decoder.embed(self.tokens(t)) for t in {p[3] for p in passes}}
        samples: dict = {}
        rounds = tqdm(range(self.repeats + 2), desc=progress, unit="round", leave=False, disable=progress is None)
        for round in rounds:
            for key, start, end, positions in passes:
                with_head = key[0] != "draft"  # a draft's head is the head over one position, timed with the full pass
                layers_time, head_time = self.once(start, end, hiddens[positions], with_head)
                if round >= 2:
                    samples.setdefault(key, []).append(layers_time)
                    if with_head:
                        samples.setdefault(("head", positions), []).append(head_time)
        return samples

    def costs(self, exit_layer: int, max_positions: int) -> PassCosts:
        """The passes of self-speculation at `exit_layer`, timed in rounds (`samples`)."""
        return summarized(self.samples((exit_layer,), max_positions), exit_layer, max_positions)


def summarized(samples: dict, exit_layer: int | None, max_positions: int) -> PassCosts:
    """`PassCosts` at `exit_layer` from the medians of the timed runs of `PassTimer.samples`; without an exit layer
    only the full pass and `head[1]` were timed, and the rest repeat them."""
    median = {key: statistics.median(times) for key, times in samples.items()}
    full = median[("full",)]
    if exit_layer is None:
        return PassCosts(full, {1: full}, full, {1: median[("head", 1)]})
    positions = range(1, max_positions + 1)
    return PassCosts(median[("draft", exit_layer)], {t: median[("verify", exit_layer, t)] for t in positions}, full,
                     {t: median[("head", t)] for t in positions})


class CostMeter:
    """Pass costs timed beside decoding. After each batch a benchmark decodes, `measure` times every pass a few
    times for that batch's rows over the context it decoded at, so that the passes see the machine as the
    decoding did: its speed drifts by a quarter from one minute to the next, and passes timed once, after the
    run, predicted a different machine (ideal speedups of 1.85x and 1.51x for one command). `costs()` is the
    median of all the times taken. The passes are still timed alone: the ideal has no overhead between them.
    They run as `generator` runs them: its decoder, through its compiled passes where it has them, in its caches."""

    def __init__(self, generator, exit_layer: int | None, max_positions: int, repeats: int = 5):
        self.generator = generator
        self.exit_layer, self.max_positions, self.repeats = exit_layer, max_positions, repeats
        self.times: dict = {}

    def measure(self, rows: int, context: int) -> None:
        g = self.generator
        timer = PassTimer(g.decoder, context, self.max_positions, g.compiled, rows, self.repeats, g.new_cache)
        exits = () if self.exit_layer is None else (self.exit_layer,)
        for key, times in timer.samples(exits, self.max_positions).items():
            self.times.setdefault(key, []).extend(times)

    def costs(self) -> PassCosts | None:
        """The median times, as `PassCosts`; None before any measurement. Medians, not means: tried on the quick
        start, means put the ideal at 1.38x, 1.61x and 1.59x in three runs where medians had given 1.33x to
        1.43x in five, and predicted the decoding no better."""
        return summarized(self.times, self.exit_layer, self.max_positions) if self.times else None
