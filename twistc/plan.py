"""The per-layer plan: which decomposition, ranks and lowering form each layer gets.

Deciding is kept apart from rewriting. Rank choosers fill a `LayerPlan` per layer from pass
options (ratio, energy, explicit ranks); passes consume it; the report holds it; `--plan FILE`
feeds an edited one back, and its entries win over the pass options. A LayerPlan also knows how
to reconstruct a kernel at its ranks, which is what a DeepTwist projection applies.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from twistc.decomp import DECOMPOSITIONS, DEFAULT_RATIO, Layout, RankRequest
from twistc.decomp.cost import ConvGeometry, Cost
from twistc.decomp.svd import ORDERS
from twistc.decomp.tiling import TileGrid
from twistc.errors import SpecError

__all__ = ["DEFAULT_RATIO", "LayerPlan", "Layout", "Plan", "RankRequest", "check_entry", "choose"]

# decomposition -> lowered forms it can take (the first is the default); "none" leaves a layer dense
LOWERINGS = {**{name: d.lowerings for name, d in DECOMPOSITIONS.items()}, "none": ("none",)}
DATA_AWARE = tuple(name for name, d in DECOMPOSITIONS.items() if d.data_aware)
_KEYS = ("decomp", "ranks", "lowering", "ratio", "energy", "order", "tile", "grid", "fit")
FITS = ("weight", "activation")


def relative_change(weight: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weight - projected) / torch.linalg.vector_norm(weight).clamp_min(1e-30)


@dataclass(frozen=True)
class LayerPlan:
    decomp: str                        # a name in twistc.decomp.DECOMPOSITIONS, or none
    ranks: tuple[int, ...]             # tucker: (r_out, r_in); svd, tiled-svd: (r,)
    lowering: str                      # one of LOWERINGS[decomp]
    ratio: float | None = None         # the requested ratio, when ranks came from one
    energy: float | None = None        # the requested energy, when ranks came from one
    order: str | None = None           # svd, tiled-svd: column order of the lowered matrix
    tile: tuple[int, int] | None = None  # tiled-svd: tile shape ...
    grid: tuple[int, int] | None = None  # ... or grid shape
    fit: str | None = None             # "activation": factors fitted to the layer's inputs (None: to the kernel)

    def tile_grid(self, matrix_shape: tuple[int, int]) -> TileGrid:
        return TileGrid.of(matrix_shape, self.tile, self.grid)

    @property
    def decomposition(self):
        return DECOMPOSITIONS[self.decomp]

    def project(self, weight: torch.Tensor, stats=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction and ||W - P(W)|| / ||W||, the share of the kernel's norm it removes."""
        projected = self.reconstruct(weight, stats)
        return projected, relative_change(weight, projected)

    def factors(self, weight: torch.Tensor, stats=None):
        """The factors of the reconstruction (`factors(w).reconstruct()` is `reconstruct(w)`); `stats`: the
        layer's input statistics (whiten.InputStats), which fit=activation fits them to."""
        return self.decomposition.fit(weight, self, stats)

    def reconstruct(self, weight: torch.Tensor, stats=None) -> torch.Tensor:
        """The kernel's low-rank reconstruction under this plan (same shape and dtype)."""
        return self.decomposition.reconstruct(weight, self, stats)

    def cost(self, g: ConvGeometry) -> Cost:
        return self.decomposition.cost(g, self)

    def tiling(self, g: ConvGeometry) -> dict | None:
        """How a 2-D decomposition tiles the lowered matrix, and what happens to ragged edge tiles."""
        return self.decomposition.tiling(g, self)

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
        if decomp not in LOWERINGS:
            raise SpecError(f"plan entry '{name}': decomp must be one of {tuple(LOWERINGS)}, got {decomp!r}")
        ints = {k: data.get(k) for k in ("ranks", "tile", "grid")}
        for key, value in ints.items():
            if value is not None and not (isinstance(value, list) and all(isinstance(r, int) for r in value)):
                raise SpecError(f"plan entry '{name}': {key} must be a list of integers, got {value!r}")
        lowering = data.get("lowering") or LOWERINGS[decomp][0]
        if lowering not in LOWERINGS[decomp]:
            raise SpecError(f"plan entry '{name}': lowering of {decomp} must be one of {LOWERINGS[decomp]}")
        order = data.get("order") or ("channel-major" if decomp != "none" and DECOMPOSITIONS[decomp].matrix else None)
        if order is not None and order not in ORDERS:
            raise SpecError(f"plan entry '{name}': order must be one of {ORDERS}, got {order!r}")
        fit = data.get("fit")
        if fit not in (None, *FITS):
            raise SpecError(f"plan entry '{name}': fit must be one of {FITS}, got {fit!r}")
        if fit == "activation" and not DECOMPOSITIONS[decomp].data_aware:
            raise SpecError(f"plan entry '{name}': fit=activation applies to {' and '.join(DATA_AWARE)}, not {decomp}")
        tup = lambda v: tuple(v) if v is not None else None
        return cls(decomp, tuple(ints["ranks"] or ()), lowering, data.get("ratio"), data.get("energy"), order,
                   tup(ints["tile"]), tup(ints["grid"]), None if fit == "weight" else fit)


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


def choose(weight: torch.Tensor, geometry: ConvGeometry, decomp: str, request: RankRequest,
           layout: Layout = Layout(), lowering: str | None = None) -> LayerPlan:
    """A plan entry for one conv: `decomp` at the ranks `request` asks for."""
    d = DECOMPOSITIONS[decomp]
    ranks, asked = d.choose_ranks(weight, geometry, request, layout)
    return LayerPlan(decomp, tuple(ranks), lowering or d.lowerings[0], order=layout.order if d.matrix else None,
                     tile=layout.tile if d.tiled else None, grid=layout.grid if d.tiled else None, **asked)


def check_entry(geometry: ConvGeometry, entry: LayerPlan) -> LayerPlan:
    """Validate a plan entry (typically from an edited file) against the layer it names."""
    if entry.decomp != "none":
        entry.decomposition.check_ranks(geometry, entry)
    return entry
