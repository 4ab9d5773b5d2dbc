"""calibrate: collect each layer's input statistics for data-aware factors (fit=activation).

For every conv and Linear layer twistc can compress, the second moment of its input columns

    C = sum_p p p^T  over the im2col patches p of a conv (channel-major), or the input rows of a Linear

over `batches` batches of train_data() (eval_data() when there is none), in one pass over the model in
eval mode. Memory: one n x n float64 matrix per layer, n = in_channels * kh * kw (the pass logs the
total); patches are folded in chunks, so a batch never holds more than CHUNK columns of any layer
at once. Under torchrun each rank takes its
share of the batches and the sums are added over the ranks, so every rank holds the same statistics.
The statistics land in the compile state (by layer name), where the lowering passes, DeepTwist and
plan-latency read them; the graph is not changed. Run again after DeepTwist training, it refreshes the
statistics of the projections that fit to the data (fit=activation), so that their final projection fits
the inputs the trained network gives the layer (a hand-off: train{finalize=false},calibrate,lower,...).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.fx as fx
from tqdm import tqdm

from twistc import distributed
from twistc.convs import ConvSite, conv_sites
from twistc.decomp.im2col import Im2Col
from twistc.decomp.whiten import InputStats
from twistc.errors import SpecError
from twistc.pipeline import Pass, PassResult, RunContext, register
from twistc.passes.lowrank import check_layers_pattern, input_stats, selected
from twistc.state import state_of

CHUNK = 1 << 16  # patch columns folded into a moment at a time


def columns(site: ConvSite, x: torch.Tensor) -> torch.Tensor:
    """The layer's input columns [N, n]: a Linear layer's input rows, or a conv's channel-major patches."""
    if site.kind == "Linear":
        return x.reshape(-1, x.shape[-1])
    image = x.unsqueeze(-1) if site.kind == "Conv1d" else x
    patches = Im2Col.of(site.geometry, "channel-major", "unfold").to(x.device)(image)  # [B, n, L]
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class _Collector(fx.Interpreter):
    """Runs the graph and folds the input of each watched node into its layer's moment."""

    def __init__(self, gm: fx.GraphModule, sites: dict[fx.Node, ConvSite], stats: dict[str, InputStats]):
        super().__init__(gm)
        self.sites, self.stats = sites, stats

    def run_node(self, node: fx.Node):
        site = self.sites.get(node)
        if site is not None:
            x = self.env[site.input] if isinstance(site.input, fx.Node) else site.input
            cols = columns(site, x.detach())
            stats = self.stats[site.name]
            for start in range(0, cols.shape[0], CHUNK):  # each chunk's product in float32, summed in float64
                part = cols[start:start + CHUNK].float()
                stats.moment += (part.T @ part).double().cpu()
            stats.count += cols.shape[0]
        return super().run_node(node)


@register
@dataclass(frozen=True)
class Calibrate(Pass):
    name = "calibrate"
    run_defaults = ("batches",)
    summary = ("collect each layer's input statistics on batches of train_data() (else eval_data()), for data-aware "
               "factors (fit=activation)")
    option_help = {"batches": "batches of data to collect on", "layers": "fnmatch patterns of the layers, '|'-joined"}
    takes_context = True

    batches: int = 16
    layers: str | None = None

    def __post_init__(self):
        if self.batches < 1:
            raise SpecError(f"calibrate: batches must be >= 1, got {self.batches}")

    def needs(self) -> tuple[str, ...]:
        return ()  # train_data() or eval_data(), whichever there is (checked when it runs)

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule, ctx: RunContext) -> PassResult:
        data = ctx.train_data or ctx.eval_data
        if data is None:
            raise SpecError("calibrate needs batches of inputs: define train_data() or eval_data() in MODEL.py")
        state = state_of(gm)
        check_layers_pattern(self.name, self.layers, list(state.layers))
        sites = {s.node: s for s in conv_sites(gm) if s.name in state.layers and selected(self.layers, s.name)
                 and s.geometry.groups == 1}
        stats = {s.name: InputStats(torch.zeros(n, n, dtype=torch.float64), 0)
                 for s in sites.values() for n in [s.geometry.in_channels * s.geometry.taps]}
        collector = _Collector(gm, sites, stats)
        was_training = gm.training
        gm.eval()
        try:
            share = distributed.my_share(itertools.islice(data(), self.batches))
            for x, _ in tqdm(share, total=self.batches, desc="calibrate", unit="batch", leave=False,
                             disable=None if ctx.progress else True):
                collector.run(*(x if isinstance(x, (tuple, list)) else (x,)))
        finally:
            gm.train(was_training)
        for s in stats.values():
            distributed.sum_(s.moment)
            s.count = distributed.total(s.count)[0]
        if not any(s.count for s in stats.values()):
            raise SpecError("calibrate: the data yielded no batches")
        state.calibration.update(stats)
        projected = [s for s in sites.values() if s.projection is not None and s.projection.plan.fit == "activation"]
        for s in projected:  # their next projection fits these inputs
            s.projection.stats = input_stats(state, s.name, s.projection.plan, self.name)
        ctx.status(f"calibrate: input statistics of {len(stats)} layers, "
                   f"{sum(s.moment.numel() * 8 for s in stats.values()) / 2**20:.1f} MiB"
                   + (f"; {len(projected)} DeepTwist projections refreshed" if projected else ""))
        return PassResult(gm, False, 0)
