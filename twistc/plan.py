"""The per-layer plan: which decomposition, ranks and lowering form each layer gets.

Deciding is kept apart from rewriting. Rank choosers fill a `LayerPlan` per layer from pass
options (ratio, energy, explicit ranks); passes consume it; the report holds it; `--plan FILE`
feeds an edited one back, and its entries win over the pass options. A LayerPlan also knows how
to reconstruct a kernel at its ranks, which is what a DeepTwist projection applies.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from twistc.decomp.cost import ConvGeometry, Cost, lowrank_cost, tucker_chain_cost
from twistc.decomp.rank import check_tucker_ranks, rank_for_energy, tucker_ranks_for_energy, tucker_ranks_for_ratio
from twistc.decomp.svd import ORDERS, lowered, singular_energies, unlowered
from twistc.decomp.tiling import TileGrid, rank_for_ratio, tiled_svd
from twistc.decomp.tucker import tucker2
from twistc.errors import RankError, SpecError

DEFAULT_RATIO = 2.0
# decomposition -> lowering forms it can take (the first is the default); "none" leaves a layer dense
LOWERINGS = {"tucker": ("tucker-chain",), "svd": ("svd-conv", "svd-im2col"), "tiled-svd": ("tiled-lowrank",),
             "none": ("none",)}
DECOMPOSITIONS = tuple(LOWERINGS)
_KEYS = ("decomp", "ranks", "lowering", "ratio", "energy", "order", "tile", "grid")


@dataclass(frozen=True)
class LayerPlan:
    decomp: str                        # tucker | svd | tiled-svd | none
    ranks: tuple[int, ...]             # tucker: (r_out, r_in); svd, tiled-svd: (r,)
    lowering: str                      # one of LOWERINGS[decomp]
    ratio: float | None = None         # the requested ratio, when ranks came from one
    energy: float | None = None        # the requested energy, when ranks came from one
    order: str | None = None           # svd, tiled-svd: column order of the lowered matrix
    tile: tuple[int, int] | None = None  # tiled-svd: tile shape ...
    grid: tuple[int, int] | None = None  # ... or grid shape

    def tile_grid(self, matrix_shape: tuple[int, int]) -> TileGrid:
        if self.tile is not None:
            return TileGrid.from_tile(matrix_shape, self.tile)
        return TileGrid.from_grid(matrix_shape, self.grid or (1, 1))

    def project(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction and ||W - P(W)|| / ||W||, the share of the kernel's norm it removes."""
        projected = self.reconstruct(weight)
        change = torch.linalg.vector_norm(weight - projected) / torch.linalg.vector_norm(weight).clamp_min(1e-30)
        return projected, change

    def reconstruct(self, weight: torch.Tensor) -> torch.Tensor:
        """The kernel's low-rank reconstruction under this plan (same shape and dtype)."""
        if self.decomp == "tucker":
            return tucker2(weight, self.ranks).reconstruct()
        k = lowered(weight, self.order)
        approx = tiled_svd(k, self.tile_grid(tuple(k.shape)), self.ranks[0]).reconstruct()
        return unlowered(approx, tuple(weight.shape), self.order)

    def cost(self, g: ConvGeometry) -> Cost:
        if self.decomp == "tucker":
            return tucker_chain_cost(g, self.ranks)
        n = g.in_channels * g.taps
        return lowrank_cost(g, self.tile_grid((g.out_channels, n)).factor_params(self.ranks[0]))

    def tiling(self, g: ConvGeometry) -> dict | None:
        """How a 2-D decomposition tiles the lowered matrix, and what happens to ragged edge tiles."""
        if self.decomp == "tucker":
            return None
        grid = self.tile_grid((g.out_channels, g.in_channels * g.taps))
        return {"grid": list(grid.shape), "tile": list(grid.tile),
                "ragged_edges": "zero-padded to the common tile shape" if grid.ragged else None}

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, name: str, data: dict) -> "LayerPlan":
        if not isinstance(data, dict):
            raise SpecError(f"plan entry '{name}' is {json.dumps(data)}, not an object such as "
                            '{"decomp": "tucker", "ranks": [16, 8]}')
        unknown = set(data) - set(_KEYS)
        if unknown:
            raise SpecError(f"plan entry '{name}' has unknown keys {sorted(unknown)}")
        decomp = data.get("decomp")
        if decomp not in DECOMPOSITIONS:
            raise SpecError(f"plan entry '{name}': decomp must be one of {DECOMPOSITIONS}, got {decomp!r}")
        ints = {k: data.get(k) for k in ("ranks", "tile", "grid")}
        for key, value in ints.items():
            if value is not None and not (isinstance(value, list) and all(isinstance(r, int) for r in value)):
                raise SpecError(f"plan entry '{name}': {key} must be a list of integers, got {value!r}")
        lowering = data.get("lowering") or LOWERINGS[decomp][0]
        if lowering not in LOWERINGS[decomp]:
            raise SpecError(f"plan entry '{name}': lowering of {decomp} must be one of {LOWERINGS[decomp]}")
        order = data.get("order") or (None if decomp in ("tucker", "none") else "channel-major")
        if order is not None and order not in ORDERS:
            raise SpecError(f"plan entry '{name}': order must be one of {ORDERS}, got {order!r}")
        tup = lambda v: tuple(v) if v is not None else None
        return cls(decomp, tuple(ints["ranks"] or ()), lowering, data.get("ratio"), data.get("energy"), order,
                   tup(ints["tile"]), tup(ints["grid"]))


@dataclass
class Plan:
    """Layer name (qualified parameter name without '.weight') -> LayerPlan."""

    layers: dict[str, LayerPlan] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def get(self, name: str) -> LayerPlan | None:
        return self.layers.get(name)

    def set(self, name: str, entry: LayerPlan) -> None:
        self.layers[name] = entry

    def to_json(self) -> dict:
        return {name: entry.to_json() for name, entry in self.layers.items()}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        if not isinstance(data, dict):
            raise SpecError("a plan must be a JSON object mapping layer names to entries")
        if isinstance(data.get("plan"), dict):  # a whole report.json
            data = data["plan"]
        return cls({name: LayerPlan.from_json(name, entry) for name, entry in data.items()})

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file: either a plan object or a whole report.json (its 'plan' is used)."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SpecError(f"plan file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"plan file {path} is not valid JSON: {e}") from None
        except IsADirectoryError:
            raise SpecError(f"plan file {path} is a folder; give the plan's JSON file (or a report.json)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"cannot read plan file {path}: {getattr(e, 'strerror', None) or e}") from None
        return cls.from_json(data)


@dataclass(frozen=True)
class RankRequest:
    """What the user asked for; at most one of ranks, energy, ratio may be set."""

    ratio: float | None = None
    ranks: tuple[int, ...] | None = None
    energy: float | None = None
    round_to: int = 1

    def __post_init__(self):
        given = [k for k in ("ratio", "ranks", "energy") if getattr(self, k) is not None]
        if len(given) > 1:
            raise SpecError(f"give only one of ratio, ranks, energy (got {', '.join(given)})")


@dataclass(frozen=True)
class Layout:
    """How a 2-D decomposition sees the kernel: column order and tiling."""

    order: str = "channel-major"
    tile: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None


def choose(weight: torch.Tensor, geometry: ConvGeometry, decomp: str, request: RankRequest,
           layout: Layout = Layout(), lowering: str | None = None) -> LayerPlan:
    """A plan entry for one conv: `decomp` at the ranks `request` asks for."""
    lowering = lowering or LOWERINGS[decomp][0]
    if decomp == "tucker":
        return _choose_tucker(weight, geometry, request, lowering)
    entry = LayerPlan(decomp, (), lowering, order=layout.order,
                      tile=layout.tile if decomp == "tiled-svd" else None,
                      grid=(layout.grid if decomp == "tiled-svd" else None))
    shape = (geometry.out_channels, geometry.in_channels * geometry.taps)
    grid = entry.tile_grid(shape)
    if request.ranks is not None:
        return replace(entry, ranks=(check_matrix_rank(grid, request.ranks),))
    if request.energy is not None:
        if decomp != "svd":
            raise SpecError("energy= chooses ranks for tucker and svd only; give ratio or ranks for tiled-svd")
        return replace(entry, ranks=(rank_for_energy(singular_energies(lowered(weight, layout.order)), request.energy),),
                       energy=request.energy)
    ratio = request.ratio if request.ratio is not None else DEFAULT_RATIO
    return replace(entry, ranks=(rank_for_ratio(grid, ratio),), ratio=ratio)


def check_matrix_rank(grid: TileGrid, ranks: tuple[int, ...]) -> int:
    top = min(grid.tile)
    if len(ranks) != 1 or not 1 <= ranks[0] <= top:
        raise RankError(f"rank {'x'.join(map(str, ranks))} is outside 1..{top} (full rank of a {grid.tile[0]}x"
                        f"{grid.tile[1]} tile)")
    return int(ranks[0])


def _choose_tucker(weight, geometry, request, lowering) -> LayerPlan:
    if request.ranks is not None:
        return LayerPlan("tucker", check_tucker_ranks(geometry, tuple(request.ranks)), lowering)
    if request.energy is not None:
        return LayerPlan("tucker", tucker_ranks_for_energy(weight, request.energy), lowering, energy=request.energy)
    ratio = request.ratio if request.ratio is not None else DEFAULT_RATIO
    return LayerPlan("tucker", tucker_ranks_for_ratio(geometry, ratio, request.round_to), lowering, ratio=ratio)


def check_entry(geometry: ConvGeometry, entry: LayerPlan) -> LayerPlan:
    """Validate a plan entry (typically from an edited file) against the layer it names."""
    if entry.decomp == "tucker":
        check_tucker_ranks(geometry, entry.ranks)
    elif entry.decomp in ("svd", "tiled-svd"):
        check_matrix_rank(entry.tile_grid((geometry.out_channels, geometry.in_channels * geometry.taps)), entry.ranks)
    return entry

