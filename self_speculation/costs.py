"""What the passes of decoding cost on this machine: the numbers every strategy's cost model reads."""

from dataclasses import dataclass


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
