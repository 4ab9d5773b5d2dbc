"""What a decomposition and a lowered form are to the rest of twistc.

Each decomposition is one `Decomposition` object in its own file under twistc/decomp/, listed in
`twistc.decomp.DECOMPOSITIONS`, and each of its lowered forms one `Form` row in its `forms`. The plan,
the `lower` pass, DeepTwist's projection, plan-latency and the report ask them, and nothing else, for:
which layers a decomposition applies to (and why not), how it chooses ranks, how it fits factors and
reconstructs a kernel at those ranks (the DeepTwist step), what its forms cost, and the module each
form puts in a layer's place. Adding a decomposition, or a form, touches its own file only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

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
    # the least ranks that keep the layer working, on its output and input side: a classifier head keeps a
    # direction per class, a stem every value it reads (its channels times its taps) on both sides, each
    # capped at that side's full rank; explicit `ranks` are taken as given
    floor: tuple[int, int] = (1, 1)

    def matrix_floor(self, top: int) -> int:
        """The least rank of a matrix decomposition whose full rank is `top`: its one rank keeps both sides."""
        return min(max(self.floor), top)

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


@dataclass(frozen=True)
class Form:
    """One lowered form: the module that replaces a layer, built from its decomposition's factors.

    `build(g, factors, bias, method)` returns that module for a layer of geometry `g`, and the name of the
    implementation it took (None when it has one only); its children run one after another in the graph
    when `chain`, else the module is called whole. `methods`: the exact implementations it can choose
    from (the lower pass's im2col=), the default first."""

    name: str
    kinds: tuple[str, ...]
    build: Callable[..., tuple[nn.Module, str | None]]
    summary: str
    chain: bool = True
    methods: tuple[str, ...] = ()

    def method_for(self, asked: str | None) -> str | None:
        """The implementation to build: `asked` where the form has it, else its default (None: it has one only)."""
        return asked if asked in self.methods else next(iter(self.methods), None)


def conv_class(spatial: int) -> type[nn.Module]:
    """nn.Conv1d for a kernel of one spatial dim (a Conv1d's lowering), else nn.Conv2d."""
    return nn.Conv1d if spatial == 1 else nn.Conv2d


def pointwise(matrix: torch.Tensor, spatial: int) -> torch.Tensor:
    """A [out, in] matrix as the weight of a 1x1 (or size-1) conv with `spatial` spatial dims."""
    return matrix.reshape(*matrix.shape, *(1,) * spatial)


@torch.no_grad()
def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)


class Decomposition:
    """One decomposition. `entry` arguments are LayerPlans with `decomp == self.name`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    forms: ClassVar[tuple[Form, ...]]       # its lowered forms, the default first
    kinds: ClassVar[tuple[str, ...]] = ("Conv2d",)  # the layer kinds it takes
    matrix: ClassVar[bool] = False          # works on the lowered matrix K[T, S*kh*kw] (order matters)
    tiled: ClassVar[bool] = False           # ... split into tiles (tile= or grid=)
    data_aware: ClassVar[bool] = False      # fits factors to a layer's input statistics (fit=activation)
    poor_fit: ClassVar[float | None] = None  # a lowering whose fit removes more of the kernel's norm is a warning

    @property
    def lowerings(self) -> tuple[str, ...]:
        """Its lowered forms' names, the default first."""
        return tuple(f.name for f in self.forms)

    def form(self, name: str) -> Form:
        return next(f for f in self.forms if f.name == name)

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

    def full_ranks(self, g: ConvGeometry, entry) -> tuple[int, ...] | None:
        """The smallest ranks at which the approximation reproduces any kernel of this geometry, or None
        where no such ranks are practical (CP)."""
        return None

    def cost(self, g: ConvGeometry, entry) -> Cost:
        """Weights and MACs per sample of the lowered form, every constant it stores included."""
        raise NotImplementedError

    def tiling(self, g: ConvGeometry, entry) -> dict | None:
        """How it tiles the lowered matrix (2-D decompositions), for the report."""
        return None

    def random_factors(self, g: ConvGeometry, entry, rand) -> object:
        """Factors of the entry's shapes with values from `rand(*shape)`: what a latency measurement builds a
        form from (its time does not depend on the values)."""
        raise NotImplementedError

    def rank_grid(self, g: ConvGeometry, steps: int, rounded) -> list[tuple[int, ...]]:
        """Candidate ranks for plan-latency: k/steps of each mode's full rank, k = 1..steps-1, passed
        through `rounded(r, top)`."""
        raise NotImplementedError

    def errors(self, weight: torch.Tensor, entries: list, stats=None) -> list[float]:
        """A cheap ||W - W_r|| / ||W|| for each entry (an upper bound where the lowering does better); for
        entries with fit=activation and `stats`, the relative error of the layer's output on those inputs."""
        raise NotImplementedError
