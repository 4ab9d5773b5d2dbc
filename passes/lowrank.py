"""The low-rank passes' shared base (LowRankOptions): which layers a pass touches and with what ranks, the floors
that keep a layer working, and the validators of their options.

Order of authority for one layer: a DeepTwist projection (the layer was trained for its ranks) >
the plan (from `--plan` or an earlier pass) > the pass options > the default ratio. Which layers a
decomposition takes, and why not, its entry in twistc.decomp.DECOMPOSITIONS says.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, replace
from typing import ClassVar

import torch.fx as fx

from twistc.convs import ConvSite, conv_sites, feeds_output, reads_input
from twistc.decomp import DECOMPOSITIONS
from twistc.decomp.cost import conv_cost
from twistc.decomp.svd import lowered
from twistc.decomp.whiten import output_error, whitener
from twistc.errors import RankError, SpecError, name_list
from twistc.pipeline import Pass
from twistc.plan import DATA_AWARE, FITS, LayerPlan, Layout, RankRequest, check_entry, choose
from twistc.state import PLANNED_DENSE, CompileState, Skip, state_of

log = logging.getLogger(__name__)
DEGENERATE = "its calibration inputs were all zero or not finite"
STEM_CHANNELS = 4  # a layer reading the model's input with at most this many channels (RGB, RGBA) keeps them all
OVERSHOOT = 1.25  # an achieved ratio above the asked one times this is a warning
MIN_SHARE = 0.005  # a layer with less of the layers' weights than this stays dense unless layers= names it


def rank_floor(gm: fx.GraphModule, site: ConvSite) -> tuple[int, int]:
    """The least (output, input) ranks that keep the layer what it is: a head (a Linear or 1x1 conv giving the
    model's scores) keeps a rank per output, a direction per class; a stem (an RGB or grey input) keeps every
    value it reads, its channels times its taps, on both sides (each capped at its side's full rank: Tucker
    keeps the input channels; a matrix form its whole input)."""
    g = site.geometry
    head = g.out_channels if g.taps == 1 and feeds_output(gm, site) else 1
    values = g.in_channels * g.taps if g.in_channels <= STEM_CHANNELS and reads_input(gm, site) else 1
    return max(head, values), values


def floor_reason(g, floor: tuple[int, int]) -> str:
    if floor[1] == 1:
        return f"the model's head: it keeps a rank per output ({g.out_channels})"
    taps = f" ({floor[1]} with its {'x'.join(map(str, g.spatial_kernel))} taps)" if g.taps > 1 else ""
    return (f"the model's stem: it keeps its {g.in_channels} input channel{'s' if g.in_channels > 1 else ''} "
            f"and every value it reads{taps}")


def keeps_floor(ranks, floor: tuple[int, int], g) -> bool:
    """Ranks at or above the floor: (r_out, r_in) for Tucker, each capped at its mode's size; a matrix form's
    one rank against both sides, capped at its full rank."""
    if len(ranks) == 2:
        return ranks[0] >= min(floor[0], g.out_channels) and ranks[1] >= min(floor[1], g.in_channels)
    return ranks[0] >= min(max(floor), g.out_channels, g.in_channels * g.taps)


def first_failure(site: ConvSite, decomp: str) -> str | None:
    """Why `decomp` cannot take this conv, or None."""
    return DECOMPOSITIONS[decomp].skip_reason(site.geometry)


@dataclass(frozen=True)
class LowRankOptions(Pass):
    """Options of every pass that chooses ranks. `layers`: fnmatch patterns joined by '|'."""

    option_help = {"layers": "fnmatch patterns of the convs to touch, joined by |",
                   "ratio": "per-layer weight compression ratio (> 1)",
                   "ranks": "explicit ranks, e.g. 16x8 (Tucker r_out x r_in) or 16 (SVD)",
                   "energy": "keep this share (0, 1] of each mode's squared singular values",
                   "round_to": "round ranks to multiples of this",
                   "rank": "vbmf: each mode's rank by empirical variational Bayesian matrix factorization",
                   "weaken": "rank=vbmf: move each rank this share (0..1) of the way to full rank",
                   "fit": "weight (factors fitted to the kernel) or activation (to the layer's output on the inputs "
                   "that calibrate collected; tucker and svd)"}

    kinds: ClassVar[tuple[str, ...]] = ("Conv2d",)  # the layer kinds it rewrites
    exclusive = (("ratio", "ranks", "energy", "rank"),)
    run_defaults = ("ratio", "fit")

    layers: str | None = None
    ratio: float | None = None
    ranks: tuple[int, ...] | None = None
    energy: float | None = None
    round_to: int = 1
    rank: str | None = None
    weaken: float = 0.0
    fit: str = "weight"

    def __post_init__(self):
        check_choice(self.fit, FITS, "fit")
        if self.ratio is not None and not 1 < self.ratio < float("inf"):
            raise RankError(f"ratio must be a finite number > 1, got {self.ratio:g}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise RankError(f"energy must be in (0, 1], got {self.energy:g}")
        if self.round_to < 1:
            raise RankError(f"round_to must be >= 1, got {self.round_to}")
        if self.ranks is not None and min(self.ranks) < 1:
            raise RankError(f"ranks must be >= 1, got {self.ranks}")
        if self.rank is not None:
            check_choice(self.rank, ("vbmf",), "rank")
        if not 0 <= self.weaken <= 1 or (self.weaken and self.rank is None):
            raise RankError(f"weaken must be in [0, 1] and goes with rank=vbmf, got weaken={self.weaken:g}")
        self.request()  # rejects more than one of ratio/ranks/energy

    def request(self) -> RankRequest:
        return RankRequest(self.ratio, self.ranks, self.energy, self.round_to,
                           self.weaken if self.rank == "vbmf" else None)

    def layout(self) -> Layout:
        """Column order and tiling for 2-D decompositions; passes with such options override this."""
        return Layout()

    @property
    def chooses_ranks(self) -> bool:
        """Whether these options ask for ranks at all."""
        return any(v is not None for v in (self.ratio, self.ranks, self.energy, self.rank))

    def selects(self, name: str) -> bool:
        return selected(self.layers, name)

    def sites(self, gm: fx.GraphModule) -> tuple[CompileState, list[ConvSite]]:
        """The original model's convs still in the graph (never parts of lowered forms)."""
        state = state_of(gm)
        check_layers_pattern(self.name, self.layers, list(state.layers))
        sites = [s for s in conv_sites(gm) if s.name in state.layers]
        takes = self.takes()
        for site in sites:
            if site.kind not in takes:
                state.skip(site.name, Skip(self.kind_reason(site.kind, takes), weak=True))
        return state, [s for s in sites if s.kind in takes]

    def takes(self) -> tuple[str, ...]:
        """The layer kinds this pass rewrites with these options."""
        return self.kinds

    def kind_reason(self, kind: str, takes: tuple[str, ...]) -> str:
        """Why a layer of `kind` is skipped."""
        return f"{kind}: {self.name} rewrites {' and '.join(takes)} layers"

    def entry(self, gm: fx.GraphModule, site: ConvSite, state: CompileState, decomp: str,
              lowering: str | None = None) -> LayerPlan | Skip:
        """The plan entry for this layer, or the reason it is skipped."""
        if not self.selects(site.name):
            return Skip(f"not selected by layers={self.layers}")
        reason = first_failure(site, decomp)
        if reason:
            return Skip(reason)
        planned = state.plan.get(site.name)
        if planned is not None:
            if planned.decomp == "none":
                return Skip(PLANNED_DENSE)
            if planned.decomp != decomp:
                return Skip(f"the plan gives it decomp={planned.decomp}")
            return check_entry(site.geometry, planned)
        return self.chosen(gm, site, decomp, lowering)

    def chosen(self, gm: fx.GraphModule, site: ConvSite, decomp: str, lowering: str | None = None) -> LayerPlan | Skip:
        """The entry these options alone give the layer (no plan), or the reason it is skipped. A head keeps a
        rank per output (a direction per class) and an RGB stem its input channels, or the layer stays dense."""
        g = site.geometry
        if self.layers is None and self.ranks is None:  # layers named by the user are theirs to judge
            share = conv_cost(g).params / max(sum(r.before.params for r in state_of(gm).layers.values()), 1)
            if share < MIN_SHARE:
                return Skip(f"it holds {share:.2%} of the layers' weights: compressing it would save too little "
                            "to matter (name it in layers= to compress it all the same)")
        floor = rank_floor(gm, site)
        why = f"{floor_reason(g, floor)}, and " if floor != (1, 1) else ""
        try:
            entry = choose(site.weight(gm), g, decomp, replace(self.request(), floor=floor), self.layout(), lowering)
        except RankError as e:
            if self.ranks is not None:
                raise RankError(f"layer {site.name}: {e}") from None
            return Skip(f"{why}{e}" if why else str(e))
        dense = conv_cost(g).params
        if entry.cost(g).params >= dense and self.ranks is None:
            return Skip(f"{why}{decomp} at ranks {entry.ranks} would not be smaller than the layer" if why else
                        f"{decomp} at ranks {entry.ranks} would not be smaller than the conv")
        achieved = dense / entry.cost(g).params
        if entry.ratio and achieved > OVERSHOOT * entry.ratio:
            log.warning("warning: layer %s: ratio %.2fx where %.2fx was asked (the nearest ranks, %s, overshoot)",
                        site.name, achieved, entry.ratio, "x".join(map(str, entry.ranks)))
        if self.fit == "activation":
            if not DECOMPOSITIONS[decomp].data_aware:
                raise SpecError(f"{self.name}: fit=activation applies to {' and '.join(DATA_AWARE)}, not {decomp}")
            entry = replace(entry, fit="activation")
        return entry

    def factors(self, gm: fx.GraphModule, site: ConvSite, entry: LayerPlan, fitted=None):
        """The layer's factors under its entry: fitted to its input statistics when the entry says
        fit=activation (calibrate must have collected them), else to its kernel; `fitted`, factors already
        fitted under the entry (a DeepTwist projection's), are reused. The layer's record gets the fit it got
        and, where there are statistics and the lowering approximates, its relative output error."""
        state, weight = state_of(gm), site.weight(gm)
        stats = input_stats(state, site.name, entry, self.name)
        factors = fitted if fitted is not None else entry.factors(weight, stats)
        record, known = state.layers[site.name], state.calibration.get(site.name)
        record.fit = "activation" if stats is not None else (
            "weight" if entry.fit != "activation" else f"weight ({DEGENERATE})")
        if known is not None and site.projection is None:  # a DeepTwist-trained kernel lowers exactly
            record.output_error = output_error(lowered(weight), lowered(factors.reconstruct()), known.covariance)
        return factors


NATURAL = ("tucker", "svd")  # a layer's natural decomposition: the first of these that takes it


def natural_decomp(site: ConvSite) -> str:
    """Tucker-2 for a kh x kw conv, an SVD pair for a 1x1 conv or a Linear layer."""
    return next((d for d in NATURAL if DECOMPOSITIONS[d].skip_reason(site.geometry) is None), NATURAL[-1])


def input_stats(state: CompileState, name: str, entry: LayerPlan, owner: str):
    """The layer's input statistics when its entry asks for fit=activation (None otherwise)."""
    if entry.fit != "activation":
        return None
    stats = state.calibration.get(name)
    if stats is None:
        raise SpecError(f"{owner}: layer {name} has fit=activation but no input statistics; put calibrate before "
                        f"{owner} in the pipeline")
    if whitener(stats.covariance) is None:
        log.warning("warning: layer %s: %s; its factors are fitted to its kernel", name, DEGENERATE)
        return None
    return stats


def selected(layers: str | None, name: str) -> bool:
    """Whether `layers=` (fnmatch patterns joined by '|'; None: all) selects the layer `name`."""
    return layers is None or any(fnmatch.fnmatchcase(name, p) for p in layers.split("|"))


def check_layers_pattern(owner: str, layers: str | None, names: list[str]) -> None:
    """A `layers=` pattern that selects none of the model's convs is an error that lists them."""
    if layers and not any(selected(layers, n) for n in names):
        raise SpecError(f"{owner}{{layers={layers}}} matches none of the model's layers ({name_list(names)})")


def check_pair(value: tuple[int, ...] | None, what: str) -> None:
    """tile= and grid= are two positive integers, HxW."""
    if value is not None and (len(value) != 2 or min(value) < 1):
        raise SpecError(f"{what} must be two positive integers HxW, e.g. 16x16, got {'x'.join(map(str, value))}")


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise SpecError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def record_plan(state: CompileState, site: ConvSite, entry: LayerPlan) -> None:
    """Write the layer's decision into the plan; a layer acted on has no skip reason."""
    state.plan.set(site.name, entry)
    state.layers[site.name].skip_reason = None
