"""Which layers a low-rank pass touches and with what ranks: the options shared by such passes.

Order of authority for one layer: the plan (from `--plan` or an earlier pass) > the pass options >
the default ratio. Legality is a table of predicates with the reason each one gives.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch.fx as fx

from twistc.convs import ConvSite, conv_sites
from twistc.decomp.cost import conv_cost, tucker_chain_cost
from twistc.errors import RankError
from twistc.pipeline import Pass
from twistc.plan import LayerPlan, RankRequest, check_entry, choose_tucker
from twistc.state import CompileState, state_of

TUCKER_LEGALITY = [
    (lambda s: s.groups != 1, lambda s: f"grouped conv (groups={s.groups}); Tucker-2 needs groups=1"),
    (lambda s: s.geometry.taps == 1, lambda s: "1x1 conv: a Tucker chain of it is never smaller"),
]


def first_failure(site: ConvSite, table) -> str | None:
    return next((reason(site) for test, reason in table if test(site)), None)


@dataclass(frozen=True)
class LowRankOptions(Pass):
    """Options of every pass that chooses ranks. `layers`: fnmatch patterns joined by '|'."""

    layers: str | None = None
    ratio: float | None = None
    ranks: tuple[int, ...] | None = None
    energy: float | None = None
    round_to: int = 1

    def __post_init__(self):
        if self.ratio is not None and not self.ratio > 1:
            raise RankError(f"ratio must be > 1, got {self.ratio:g}")
        if self.ranks is not None and min(self.ranks) < 1:
            raise RankError(f"ranks must be >= 1, got {self.ranks}")
        self.request()  # rejects more than one of ratio/ranks/energy

    def request(self) -> RankRequest:
        return RankRequest(self.ratio, self.ranks, self.energy, self.round_to)

    @property
    def chooses_ranks(self) -> bool:
        """Whether these options ask for ranks at all."""
        return any(v is not None for v in (self.ratio, self.ranks, self.energy))

    def selects(self, name: str) -> bool:
        return self.layers is None or any(fnmatch.fnmatchcase(name, p) for p in self.layers.split("|"))

    def sites(self, gm: fx.GraphModule) -> tuple[CompileState, list[ConvSite]]:
        """The original model's convs still in the graph (never parts of lowered forms)."""
        state = state_of(gm)
        return state, [s for s in conv_sites(gm) if s.name in state.layers]

    def tucker_entry(self, gm: fx.GraphModule, site: ConvSite, state: CompileState) -> LayerPlan | str:
        """The plan entry for this layer, or the reason it is skipped."""
        if not self.selects(site.name):
            return f"not selected by layers={self.layers}"
        reason = first_failure(site, TUCKER_LEGALITY)
        if reason:
            return reason
        entry = state.plan.get(site.name)
        if entry is not None:
            if entry.decomp == "none":
                return "left dense by the plan"
            return check_entry(site.geometry, entry)
        try:
            entry = choose_tucker(site.weight(gm), site.geometry, self.request())
        except RankError as e:
            if self.ranks is not None:
                raise RankError(f"layer {site.name}: {e}") from None
            return str(e)
        bigger = tucker_chain_cost(site.geometry, entry.ranks).params >= conv_cost(site.geometry).params
        if bigger and self.ranks is None:  # explicit ranks are done as asked
            return f"Tucker form at ranks {entry.ranks} would not be smaller than the conv"
        return entry
