"""The per-layer plan: which decomposition, ranks and lowering form each layer gets.

Deciding is kept apart from rewriting. Rank choosers fill a `LayerPlan` per layer from pass
options (ratio, energy, explicit ranks); passes consume it; the report holds it; `--plan FILE`
feeds an edited one back, and its entries win over the pass options.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from twistc.decomp.cost import ConvGeometry
from twistc.decomp.rank import check_tucker_ranks, tucker_ranks_for_energy, tucker_ranks_for_ratio
from twistc.errors import SpecError

DEFAULT_RATIO = 2.0
DECOMPOSITIONS = ("tucker", "none")  # "none": leave the layer dense
LOWERINGS = {"tucker": "tucker-chain", "none": "none"}


@dataclass(frozen=True)
class LayerPlan:
    decomp: str                       # "tucker"
    ranks: tuple[int, ...]            # tucker: (r_out, r_in)
    lowering: str                     # "tucker-chain"
    ratio: float | None = None        # the requested ratio, when ranks came from one
    energy: float | None = None       # the requested energy, when ranks came from one

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, name: str, data: dict) -> "LayerPlan":
        unknown = set(data) - {"decomp", "ranks", "lowering", "ratio", "energy"}
        if unknown:
            raise SpecError(f"plan entry '{name}' has unknown keys {sorted(unknown)}")
        decomp = data.get("decomp")
        if decomp not in DECOMPOSITIONS:
            raise SpecError(f"plan entry '{name}': decomp must be one of {DECOMPOSITIONS}, got {decomp!r}")
        ranks = data.get("ranks", [])
        if not isinstance(ranks, list) or not all(isinstance(r, int) for r in ranks):
            raise SpecError(f"plan entry '{name}': ranks must be a list of integers, got {ranks!r}")
        return cls(decomp, tuple(ranks), data.get("lowering") or LOWERINGS[decomp],
                   data.get("ratio"), data.get("energy"))


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


def choose_tucker(weight: torch.Tensor, geometry: ConvGeometry, request: RankRequest) -> LayerPlan:
    """A Tucker plan entry for one conv from a rank request."""
    if request.ranks is not None:
        return LayerPlan("tucker", check_tucker_ranks(geometry, tuple(request.ranks)), LOWERINGS["tucker"])
    if request.energy is not None:
        ranks = tucker_ranks_for_energy(weight, request.energy)
        return LayerPlan("tucker", ranks, LOWERINGS["tucker"], energy=request.energy)
    ratio = request.ratio if request.ratio is not None else DEFAULT_RATIO
    ranks = tucker_ranks_for_ratio(geometry, ratio, request.round_to)
    return LayerPlan("tucker", ranks, LOWERINGS["tucker"], ratio=ratio)


def check_entry(geometry: ConvGeometry, entry: LayerPlan) -> LayerPlan:
    """Validate a plan entry (typically from an edited file) against the layer it names."""
    if entry.decomp == "tucker":
        check_tucker_ranks(geometry, entry.ranks)
    return entry
