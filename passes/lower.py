"""lower: rewrite each layer exactly into its lowered form, as its plan entry says.

    layer(x; W) + b  ->  form.build(factors(W))(x)       factors: the decomposition's, at the entry's ranks

Each form is one row (`twistc.decomp.FORMS`: its layer kinds, its decomposition and the module it builds;
the formulas are in the decompositions' files). A layer's entry comes from, in order: its DeepTwist
projection (the layer was trained for those ranks; its last factors are reused, so the rewrite is
exact), the plan (`--plan` or plan-latency), or these options (ratio, ranks, energy, rank=vbmf), which
give each layer the first decomposition, in `DECOMPOSITIONS`' order, that has an allowed form for it:
Tucker-2 for a kh x kw conv, an SVD pair for a 1x1 conv or a Linear layer. The form is the entry's
when it is allowed, else the first allowed form of its decomposition that takes the layer's kind.
`forms=` restricts the forms (joined by |); the `lower-conv-*` and `lower-linear-svd` passes are this
pass with the forms fixed (passes/lower_aliases.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from twistc.convs import ConvSite, finalize_projection, lowered_path, replace_with_chain, replace_with_module
from twistc.convs import reuse_lowered, samples_alike, tied_elsewhere, weight_groups
from twistc.decomp import DECOMPOSITIONS, FORMS
from twistc.decomp.cost import ConvGeometry, Cost
from twistc.decomp.svd import ORDERS
from twistc.decomp.threads import on_free_cores
from twistc.errors import PassError, SpecError, name_list
from twistc.pipeline import PassResult, register
from twistc.plan import LayerPlan, Layout
from twistc.passes.lowrank import LowRankOptions, check_choice, check_pair, record_plan
from twistc.counting import count_weights
from twistc.state import PLANNED_DENSE, CompileState, Skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lowering(LowRankOptions):
    """The loop every lowering pass runs; `allowed()` says which forms it may build."""

    def allowed(self) -> tuple[str, ...]:
        raise NotImplementedError

    def method(self) -> str | None:
        """The implementation asked for (im2col=), or None: each form's default."""
        return None

    def takes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for f in self.allowed() for k in FORMS[f][1].kinds))

    def form_for(self, decomp: str, kind: str, planned: str | None = None) -> str | None:
        """The form a layer of `kind` gets under `decomp`: the planned one when allowed, else the first allowed
        form of the decomposition that takes the kind; None when there is none."""
        fits = [f.name for f in DECOMPOSITIONS[decomp].forms if f.name in self.allowed() and kind in f.kinds]
        return planned if planned in fits else next(iter(fits), None)

    def decomp_for(self, g: ConvGeometry) -> str | Skip:
        """For a layer with no entry: the first decomposition with an allowed form for it that takes it."""
        mine = [d for d in DECOMPOSITIONS if self.form_for(d, g.kind)]
        reasons = [DECOMPOSITIONS[d].skip_reason(g) for d in mine]
        return next((d for d, why in zip(mine, reasons) if why is None), None) or Skip(reasons[0])

    def lowering_entry(self, gm: fx.GraphModule, site: ConvSite, state: CompileState) -> LayerPlan | Skip:
        """The layer's entry, from its projection, its plan entry or these options, with the form it gets."""
        projection, planned = site.projection, state.plan.get(site.name)
        if projection is not None:
            entry = projection.plan
            if not self.selects(site.name):
                return Skip(f"not selected by layers={self.layers}")
            if self.chooses_ranks:
                own = self.chosen(gm, site, entry.decomp)
                if isinstance(own, Skip) or own.ranks != entry.ranks:
                    raise PassError(
                        f"layer {site.name}: {self.spec()} asks for ranks {None if isinstance(own, Skip) else own.ranks}"
                        f" but deeptwist trained the layer with ranks {entry.ranks}; drop the rank options of "
                        f"{self.name}")
        elif planned is not None:
            if planned.decomp == "none":
                return Skip(PLANNED_DENSE)
            entry = self.entry(gm, site, state, planned.decomp)
        elif not self.chooses_ranks:
            return Skip("no ranks asked for: give ratio, ranks or energy, or a plan entry", weak=True)
        else:
            decomp = self.decomp_for(site.geometry)
            entry = decomp if isinstance(decomp, Skip) else self.entry(gm, site, state, decomp)
        if isinstance(entry, Skip):
            return entry
        form = self.form_for(entry.decomp, site.kind, entry.lowering)
        if form is None:
            trained = "trained" if projection is not None else "planned"
            return Skip(f"{trained} with decomp={entry.decomp}, which {self.name} does not lower "
                        f"(it lowers {', '.join(self.allowed())}); add a pass that lowers {entry.decomp}")
        return replace(entry, lowering=form)

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        state, sites = self.sites(gm)
        rewrites = 0
        with on_free_cores():
            for group in weight_groups(gm, sites).values():  # one lowering per weight, reused by its other uses
                rewrites += self.lower_group(gm, state, group)
        return PassResult(gm, rewrites > 0, rewrites)

    def lower_group(self, gm: fx.GraphModule, state: CompileState, group: list[ConvSite]) -> int:
        site = group[0]
        entry = self.lowering_entry(gm, site, state)
        if not isinstance(entry, Skip) and not samples_alike(gm, group):
            entry = Skip("shares its weight with convs that sample or add bias differently "
                         f"({name_list([s.node.name for s in group])})")
        tied = [] if isinstance(entry, Skip) else tied_elsewhere(gm, group)
        if tied:
            entry = Skip(f"its weight is tied to {name_list(tied)}, which would keep the dense weight: the model "
                         "would store both; untie them to compress it")
        if isinstance(entry, Skip):
            state.skip(site.name, entry)
            return 0
        finalize_projection(gm, site)
        self.rewrite(gm, state, site, entry)
        for other in group[1:]:
            reuse_lowered(gm, other, site.lowered_to)
        return 1

    def rewrite(self, gm: fx.GraphModule, state: CompileState, site: ConvSite, entry: LayerPlan) -> None:
        """Put the entry's form in the layer's place and record what happened."""
        decomposition, form = FORMS[entry.lowering]
        projection, weight = site.projection, site.weight(gm)
        # a trained kernel is its projection's reconstruction: those factors are reused, exact, with no refit
        reused = projection.fitted if projection is not None and projection.holds(weight) else None
        factors = self.factors(gm, site, entry, reused)
        record = state.layers[site.name]
        if decomposition.poor_fit is not None:  # a fit that can be poor records its kernel error, and warns
            record.approx_error = float(torch.linalg.vector_norm(weight - factors.reconstruct())
                                        / torch.linalg.vector_norm(weight).clamp_min(1e-30))
            if record.approx_error > decomposition.poor_fit:
                log.warning("warning: layer %s: %s at ranks %s fits poorly (it removes %.0f%% of the kernel's norm); "
                            "raise the ranks or use another decomposition", site.name, entry.decomp,
                            "x".join(map(str, entry.ranks)), 100 * record.approx_error)
        try:
            module, method = form.build(site.geometry, factors, site.bias(gm), form.method_for(self.method()))
        except ValueError as e:
            raise PassError(f"layer {site.name}: {e}") from None
        path = lowered_path(gm, site, entry.decomp.split("-")[0])  # conv_tucker, conv_tiled, ...
        (replace_with_chain if form.chain else replace_with_module)(gm, site, path, module)
        record_plan(state, site, entry)
        record.lowering, record.form, record.module = entry.lowering, method, site.lowered_to
        record.after = lowered_cost(gm, record, entry.cost(site.geometry).macs)
        record.tiles = entry.tiling(site.geometry)
        if projection is not None:
            record.final_projection_change = float(projection.change)


@register
@dataclass(frozen=True)
class Lower(Lowering):
    name = "lower"
    run_defaults = ("ratio", "fit", "order", "tile", "grid")
    summary = "rewrite each layer into its lowered form (Tucker-2 chains for kxk convs, SVD pairs for 1x1 convs and " \
              "Linear layers, or as the plan says), exactly at the chosen ranks"
    option_help = {**LowRankOptions.option_help, "forms": f"allowed forms joined by |: {', '.join(FORMS)} (default: all)",
                   "order": "svd, tiled-svd: column order of the lowered matrix, channel-major or tap-major",
                   "tile": "tiled-svd: tile shape HxW (ragged edges allowed)", "grid": "tiled-svd: tile grid RxC",
                   "im2col": "forms built on im2col: " + ", ".join(dict.fromkeys(
                       m for _, f in FORMS.values() for m in f.methods)) + " (default: each form's first)"}

    forms: str | None = None
    order: str = "channel-major"
    tile: tuple[int, ...] | None = None
    grid: tuple[int, ...] | None = None
    im2col: str | None = None

    def __post_init__(self):
        super().__post_init__()
        for form in self.allowed():
            check_choice(form, tuple(FORMS), "forms")
        check_layout(self.order, self.tile, self.grid)
        methods = tuple(dict.fromkeys(m for f in self.allowed() for m in FORMS[f][1].methods))
        if self.im2col is not None:
            if not methods:
                raise SpecError(f"im2col applies to forms built on im2col, not {', '.join(self.allowed())}")
            check_choice(self.im2col, methods, "im2col")

    def allowed(self) -> tuple[str, ...]:
        return tuple(self.forms.split("|")) if self.forms else tuple(FORMS)

    def method(self) -> str | None:
        return self.im2col

    def layout(self) -> Layout:
        return Layout(self.order, self.tile, self.grid if self.tile is None else None)


def lowered_cost(gm: fx.GraphModule, record, macs: int) -> Cost:
    """A lowered layer's cost: the weights and constants its module stores, and `macs`."""
    return Cost(count_weights(gm.get_submodule(record.module)), macs)


def check_layout(order: str, tile, grid) -> None:
    check_choice(order, ORDERS, "order")
    if tile is not None and grid is not None:
        raise SpecError("give tile=HxW or grid=RxC, not both")
    check_pair(tile, "tile")
    check_pair(grid, "grid")
