"""How far a timing can be trusted: the spread and drift of its samples and the machine's load.

Timers are compared in pairs (each repetition runs every timer once), so noise that hits both
cancels in their ratio. What does not cancel shows in the ratios themselves: a wide spread (their
interquartile range over their median), a drift between the first and second half of the run, or
a load average above what the cores left free can absorb. Any of these marks a timing as
untrustworthy: the caller measures longer, and if that does not help, says so instead of printing a
confident figure.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, field

# a paired timing is unsteady past these: the ratios' interquartile range over their median, and the
# relative change of the ratios' median between the first and the second half of the repetitions
MAX_SPREAD = 0.25
MAX_DRIFT = 0.10


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load() -> float:
    """The 1-minute load average (0 where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def busy(load_avg: float, n_cores: int, threads: int) -> bool:
    """Whether other work competes for the cores a timing with `threads` threads runs on: the load beyond
    the timing's own threads exceeds the cores it leaves free (by half a core)."""
    return load_avg - threads > max(n_cores - threads, 0) + 0.5


def _spread(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / max(abs(statistics.median(values)), 1e-12)


def _drift(values: list[float]) -> float:
    half = len(values) // 2
    if half < 3:
        return 0.0
    a, b = statistics.median(values[:half]), statistics.median(values[half:])
    return abs(a - b) / max(abs(statistics.median(values)), 1e-12)


@dataclass
class Sampling:
    """How a timing was taken: the spread and drift of its paired ratios, the load and cores then."""

    spread: float = 0.0
    drift: float = 0.0
    load: float = field(default_factory=lambda: load())
    cores: int = field(default_factory=lambda: cores())
    threads: int = 1

    @classmethod
    def now(cls, threads: int = 1) -> "Sampling":
        return cls(threads=threads)

    @classmethod
    def of(cls, samples: list[list[float]], threads: int = 1, load_avg: float | None = None) -> "Sampling":
        """From round-robin samples (one list per timer): the ratios of each timer to the first (a single
        timer: its own samples), the worst spread and drift among them."""
        series = ([[o / max(b, 1e-12) for b, o in zip(samples[0], other)] for other in samples[1:]]
                  if len(samples) > 1 else samples)
        return cls(max(map(_spread, series), default=0.0), max(map(_drift, series), default=0.0),
                   load() if load_avg is None else load_avg, cores(), threads)

    @classmethod
    def from_json(cls, data: dict) -> "Sampling":
        if "spread" not in data:  # recorded without a record of how it was taken: unknown, so not trusted
            return cls(spread=float("inf"), load=float("inf"))
        return cls(float(data["spread"]), float(data.get("drift", 0.0)), float(data.get("load", 0.0)),
                   int(data.get("cores", 1)), int(data.get("threads", 1)))

    def to_json(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @property
    def busy(self) -> bool:
        return busy(self.load, self.cores, self.threads)

    def problems(self) -> list[str]:
        """Why this timing is not to be trusted, in words; empty when it is."""
        out = []
        if self.spread > MAX_SPREAD:
            out.append(f"paired ratios spread {self.spread:.0%} (at most {MAX_SPREAD:.0%} is steady)")
        if self.drift > MAX_DRIFT:
            out.append(f"they drifted {self.drift:.0%} between the first and second half")
        if self.busy:
            out.append(f"load average {self.load:.1f} on {self.cores} core(s) with {self.threads} timing thread(s)")
        return out

    @property
    def trustworthy(self) -> bool:
        return not self.problems()
