"""What a decomposition is to the rest of twistc.

Each decomposition is one `Decomposition` object in its own file under twistc/decomp/, listed in
`twistc.decomp.DECOMPOSITIONS`. The plan, the passes, DeepTwist's projection, plan-latency and the
report ask it, and nothing else, for: which layers it applies to (and why not), how it chooses ranks,
how it reconstructs a kernel at those ranks (the DeepTwist step), what its lowered forms cost, and the
lowered forms themselves (the passes named in `lowerings`). Adding one means one file here and, for a
new lowered form, one pass file and one module in `twistc.ops`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from twistc.decomp.cost import ConvGeometry, Cost
from twistc.defaults import DEFAULT_RATIO  # noqa: F401  (the decompositions' default, re-exported)
from twistc.errors import SpecError



@dataclass(frozen=True)
class RankRequest:
    """What the user asked for; at most one of ranks, energy, ratio, vbmf may be set. `vbmf` is the
    weakening factor of VBMF ranks (0: VBMF's own ranks)."""

    ratio: float | None = None
    ranks: tuple[int, ...] | None = None
    energy: float | None = None
    round_to: int = 1
    vbmf: float | None = None
    # the least ranks that keep the layer working, on its output and input side (a classifier head keeps a
    # direction per class, an RGB stem's input channel mode its channels: Tucker's r_in; a matrix
    # decomposition has no input mode and takes the output side's); explicit `ranks` are taken as given
    floor: tuple[int, int] = (1, 1)

    def __post_init__(self):
        given = [k for k in ("ratio", "ranks", "energy", "vbmf") if getattr(self, k) is not None]
        if len(given) > 1:
            names = [("rank=vbmf" if k == "vbmf" else k) for k in given]
            raise SpecError(f"give only one of ratio, ranks, energy, rank=vbmf (got {', '.join(names)})")


@dataclass(frozen=True)
class Layout:
    """How a 2-D decomposition sees the kernel: column order and tiling."""

    order: str = "channel-major"
    tile: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class Reconstructed:
    kernel: torch.Tensor

    def reconstruct(self) -> torch.Tensor:
        return self.kernel


class Decomposition:
    """One decomposition. `entry` arguments are LayerPlans with `decomp == self.name`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    lowering_passes: ClassVar[dict[str, str]]  # its lowered forms (the default first) -> the pass that makes each
    form_kinds: ClassVar[dict[str, tuple[str, ...]]] = {}  # forms that take only some of `kinds`
    kinds: ClassVar[tuple[str, ...]] = ("Conv2d",)  # the layer kinds it takes
    matrix: ClassVar[bool] = False          # works on the lowered matrix K[T, S*kh*kw] (order matters)
    tiled: ClassVar[bool] = False           # ... split into tiles (tile= or grid=)
    data_aware: ClassVar[bool] = False      # fits factors to a layer's input statistics (fit=activation)

    @property
    def lowerings(self) -> tuple[str, ...]:
        """Its lowered forms, the default first."""
        return tuple(self.lowering_passes)

    def kinds_of(self, form: str) -> tuple[str, ...]:
        """The layer kinds a lowered form takes."""
        return self.form_kinds.get(form, self.kinds)

    def skip_reason(self, g: ConvGeometry) -> str | None:
        """Why a layer of this geometry cannot take this decomposition, or None."""
        if g.kind not in self.kinds:
            return f"{g.kind}: {self.name} applies to {' and '.join(self.kinds)} layers"
        if g.groups != 1:
            return f"grouped conv (groups={g.groups}); only groups=1 is decomposed"
        return None

    def choose_ranks(self, weight: torch.Tensor, g: ConvGeometry, request: RankRequest,
                     layout: Layout) -> tuple[tuple[int, ...], dict]:
        """The ranks `request` asks for, and what to record of it ({"ratio": R} or {"energy": E})."""
        raise NotImplementedError

    def check_ranks(self, g: ConvGeometry, entry) -> tuple[int, ...]:
        """The entry's ranks, or RankError when they do not fit the layer."""
        raise NotImplementedError

    def reconstruct(self, weight: torch.Tensor, entry, stats=None) -> torch.Tensor:
        """The kernel's approximation at the entry's ranks (same shape and dtype): DeepTwist's projection.
        `stats` (whiten.InputStats): the layer's input statistics, used when the entry has fit=activation."""
        return self.fit(weight, entry, stats).reconstruct()

    def fit(self, weight: torch.Tensor, entry, stats=None):
        """The factors of the approximation (anything with `reconstruct()`). A DeepTwist projection keeps
        the last ones, so that a lowering whose fit is not unique (CP) can reuse them and stay exact."""
        return Reconstructed(self.reconstruct(weight, entry, stats))

    def cost(self, g: ConvGeometry, entry) -> Cost:
        """Weights and MACs per sample of the lowered form, every constant it stores included."""
        raise NotImplementedError

    def tiling(self, g: ConvGeometry, entry) -> dict | None:
        """How it tiles the lowered matrix (2-D decompositions), for the report."""
        return None

    def rank_grid(self, g: ConvGeometry, steps: int, rounded) -> list[tuple[int, ...]]:
        """Candidate ranks for plan-latency: k/steps of each mode's full rank, k = 1..steps-1, passed
        through `rounded(r, top)`."""
        raise NotImplementedError

    def errors(self, weight: torch.Tensor, entries: list, stats=None) -> list[float]:
        """A cheap ||W - W_r|| / ||W|| for each entry (an upper bound where the lowering does better); for
        entries with fit=activation and `stats`, the relative error of the layer's output on those inputs."""
        raise NotImplementedError
