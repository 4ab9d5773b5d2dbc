"""deeptwist: route each selected conv's weight through a DeepTwist projection.

    conv(x, W)  ->  conv(x, project(W))      project: every `period` training steps (every `late_period`
                                               after step `late_after`; or adapted so that each
                                               projection removes about `target_change`),
                                               W <- reconstruct(decompose(W, ranks)) in place,
                                               the ranks falling from full over the first `ramp` steps

`decomp` is tucker (Tucker-2 over the channel modes), svd (SVD of the lowered T x S*kh*kw matrix,
columns in `order`), tiled-svd (one SVD per tile of that matrix, tiles given by `tile` or `grid`),
cp, or natural: each layer's natural one (Tucker-2 for kh x kw convs, SVD for 1x1 convs and Linear
layers).
The model keeps its shape while it trains; the projection module (projection.LowRankProjection) holds the
layer's plan entry, and lowering passes read it from there. An nn.Conv2d becomes F.conv2d on its
own parameters (so the weight is visible as get_attr -> project -> conv); a padding mode other than
zeros becomes an explicit F.pad in front.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F

from twistc.convs import ConvSite, erase_if_dead, insert_module, weight_groups
from twistc.decomp import DECOMPOSITIONS
from twistc.decomp.svd import ORDERS
from twistc.errors import SpecError
from twistc.projection import LowRankProjection
from twistc.pipeline import PassResult, register
from twistc.plan import Layout
from twistc.passes.lowrank import LowRankOptions, check_choice, check_pair, input_stats, natural_decomp, record_plan
from twistc.state import Skip



@register
@dataclass(frozen=True)
class DeepTwist(LowRankOptions):
    name = "deeptwist"
    run_defaults = ("ratio", "fit", "order", "tile", "grid", "period")
    writes_plan = True
    summary = "training-time: project each selected conv's weight to low rank every `period` steps"
    option_help = {**LowRankOptions.option_help, "decomp": " or ".join((*DECOMPOSITIONS, "natural (tucker for kxk "
                                                                        "convs, svd for 1x1 convs and Linear layers)")),
                   "period": "S_D: training steps between projections",
                   "late_period": "S_D after step late_after (a lower S_D late in training)",
                   "late_after": "the training step after which late_period applies",
                   "target_change": "adapt S_D per layer (starting at period) so that a projection removes about "
                   "this fraction of the kernel's norm, e.g. 0.01",
                   "ramp": "steps over which each layer's projection ranks fall from full rank to its target, on a "
                   "cubic schedule (gradual compression); 0: the target from the first projection",
                   "order": "svd, tiled-svd: column order of the lowered matrix, channel-major or tap-major",
                   "tile": "tiled-svd: tile shape HxW", "grid": "tiled-svd: tile grid RxC"}

    kinds = ("Conv2d", "Conv1d", "Linear")  # the decomposition says which it takes

    decomp: str = "tucker"
    period: int = 200
    late_period: int | None = None
    late_after: int | None = None
    target_change: float | None = None
    ramp: int = 0
    order: str = "channel-major"
    tile: tuple[int, ...] | None = None
    grid: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.decomp, (*DECOMPOSITIONS, "natural"), "decomp")
        check_choice(self.order, ORDERS, "order")
        if self.period < 1:
            raise SpecError(f"period must be >= 1, got {self.period}")
        if (self.late_period is None) != (self.late_after is None):
            raise SpecError("deeptwist: give late_period and late_after together (S_D = late_period after step "
                            "late_after)")
        if self.late_period is not None and (self.late_period < 1 or self.late_after < 0):
            raise SpecError(f"deeptwist: late_period must be >= 1 and late_after >= 0, got {self.late_period} and "
                            f"{self.late_after}")
        if self.target_change is not None and not 0 < self.target_change < 1:
            raise SpecError(f"deeptwist: target_change must be in (0, 1), e.g. 0.01, got {self.target_change}")
        if self.target_change is not None and self.late_period is not None:
            raise SpecError("deeptwist: target_change adapts S_D itself; leave out late_period and late_after")
        if self.ramp < 0:
            raise SpecError(f"deeptwist: ramp must be >= 0 training steps, got {self.ramp}")
        check_pair(self.tile, "tile")
        check_pair(self.grid, "grid")
        tiled = [name for name, d in DECOMPOSITIONS.items() if d.tiled]
        if self.decomp in tiled and (self.tile is None) == (self.grid is None):
            raise SpecError(f"decomp={self.decomp} needs exactly one of tile=HxW or grid=RxC")
        if self.decomp not in tiled and (self.tile or self.grid):
            raise SpecError(f"tile and grid apply to decomp={' or '.join(tiled)} only")

    def check_complete(self, before, after) -> None:
        if not any(stage.name == "train" and getattr(stage, "epochs", 0) > 0 for stage in after):
            raise SpecError("deeptwist needs a train stage with epochs > 0 after it (and train_data() in MODEL.py)")

    def layout(self) -> Layout:
        return Layout(self.order, self.tile, self.grid)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        state, sites = self.sites(gm)
        rewrites = 0
        for group in weight_groups(gm, sites).values():  # a weight used by several convs is projected once
            site = group[0]
            if site.projection is not None:
                continue
            planned = state.plan.get(site.name)  # a plan's decomposition wins over the option
            decomp = (planned.decomp if planned is not None and planned.decomp in DECOMPOSITIONS else
                      natural_decomp(site) if self.decomp == "natural" else self.decomp)
            entry = self.entry(gm, site, state, decomp)
            if isinstance(entry, Skip):
                state.skip(site.name, entry)
                continue
            full = DECOMPOSITIONS[entry.decomp].full_ranks(site.geometry, entry)
            if self.ramp and full is None:
                raise SpecError(f"deeptwist: layer {site.name}: ramp needs a decomposition with a full-rank form "
                                f"(tucker, svd, tiled-svd), not {entry.decomp}")
            record_plan(state, site, entry)
            state.layers[site.name].projected = True
            projection = LowRankProjection(site.name, site.weight_name, state.plan, self.period, self.late_period,
                                           self.late_after, self.target_change,
                                           input_stats(state, site.name, entry, self.name), self.ramp, full)
            insert_module(gm, f"{site.weight_name}_projection", projection)
            projected = None
            for use in group:
                projected = _route_weight(gm, use, f"{site.weight_name}_projection", projected)
            rewrites += 1
        return PassResult(gm, rewrites > 0, rewrites)


def _route_weight(gm: fx.GraphModule, site: ConvSite, projection_path: str,
                  projected: fx.Node | None = None) -> fx.Node:
    """Feed the conv its weight through the projection; `projected`: the projection's node, when an
    earlier use of the same weight made it. Returns that node."""
    graph = gm.graph
    reader = site.weight_reader or site.node
    with graph.inserting_before(reader):
        if projected is None:
            projected = graph.call_module(projection_path, (graph.get_attr(site.weight_name),))
        if not site.is_module:
            old_weight = next(n for n in reader.all_input_nodes if n.op == "get_attr" and n.target == site.weight_name)
            reader.replace_input_with(old_weight, projected)
            erase_if_dead(gm, [old_weight])
            return projected
        bias = graph.get_attr(site.bias_name) if site.bias_name else None
        if site.kind == "Linear":
            layer = graph.call_function(F.linear, (site.input, projected, bias))
        else:
            g = site.geometry
            args = g.conv_args()
            x, padding = site.input, args["padding"]
            if g.padding_mode != "zeros":
                pads = gm.get_submodule(site.name)._reversed_padding_repeated_twice
                x = graph.call_function(F.pad, (x, tuple(pads)), {"mode": g.padding_mode})
                padding = 0
            conv = F.conv1d if site.kind == "Conv1d" else F.conv2d
            layer = graph.call_function(conv, (x, projected, bias, args["stride"], padding, args["dilation"],
                                               g.groups))
    layer.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(layer)
    graph.erase_node(site.node)
    return projected
