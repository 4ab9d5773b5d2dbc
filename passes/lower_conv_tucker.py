"""lower-conv-tucker: rewrite a kh x kw conv as its Tucker-2 chain.

    W[T,S,kh,kw] ~= G[R_out,R_in,kh,kw] x_0 U_out[T,R_out] x_1 U_in[S,R_in]
    conv(x, W) + b  ->  conv1x1(conv_khxkw(conv1x1(x, U_in^T), G), U_out) + b

Layers that were not trained by DeepTwist need ranks: from the options or from the plan.
The core keeps the original stride, padding (mode included), dilation; the bias moves to the last
1x1. When the weight flows through a DeepTwist projection, the decomposition and ranks come from
that projection, which first applies its final projection (idempotent), so the rewrite is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from twistc.convs import lowered_path, replace_with_chain
from twistc.decomp.cost import tucker_chain_cost
from twistc.decomp.tucker import tucker2
from twistc.errors import PassError
from twistc.ops import TuckerConv
from twistc.pipeline import PassResult
from twistc.plan import LayerPlan
from twistc.selection import LowRankOptions, first_failure, TUCKER_LEGALITY


@dataclass(frozen=True)
class LowerConvTucker(LowRankOptions):
    name = "lower-conv-tucker"
    summary = "rewrite each kh x kw conv as 1x1 -> kh x kw -> 1x1 (Tucker-2), exactly at the chosen ranks"

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        state, sites = self.sites(gm)
        rewrites = 0
        for site in sites:
            weight = site.weight(gm)
            if site.projection is not None:
                entry = self._from_projection(gm, site, state)
                if isinstance(entry, str):
                    state.skip(site.name, entry)
                    continue
                site.projection.finalize_(weight) if not site.projection.finalized else site.projection.project_(weight)
            elif site.name not in state.plan and not self.chooses_ranks:
                state.skip(site.name, "no ranks asked for: give ratio, ranks or energy, or a plan entry")
                continue
            else:
                entry = self.tucker_entry(gm, site, state)
                if isinstance(entry, str):
                    state.skip(site.name, entry)
                    continue
            factors = tucker2(weight, tuple(entry.ranks))
            module = TuckerConv(site.conv_args(), factors.u_out, factors.core, factors.u_in, site.bias(gm))
            path = lowered_path(gm, site, "tucker")
            replace_with_chain(gm, site, path, module)
            state.plan.set(site.name, entry)
            record = state.layers[site.name]
            record.decomp, record.ranks, record.ratio_requested = "tucker", tuple(entry.ranks), entry.ratio
            record.lowering, record.skip_reason = "tucker-chain", None
            record.after = tucker_chain_cost(site.geometry, tuple(entry.ranks))
            rewrites += 1
        return PassResult(gm, rewrites > 0, rewrites)

    def _from_projection(self, gm, site, state) -> LayerPlan | str:
        projection = site.projection
        if projection.decomp != "tucker":
            return f"trained with decomp={projection.decomp}; lower it with the matching pass"
        reason = first_failure(site, TUCKER_LEGALITY)
        if reason:
            return reason
        entry = state.plan.get(site.name) or LayerPlan("tucker", projection.ranks, "tucker-chain")
        if self.chooses_ranks:
            own = self.tucker_entry(gm, site, state.__class__(state.example_inputs, state.output_shapes))
            own_ranks = None if isinstance(own, str) else tuple(own.ranks)
            if own_ranks != projection.ranks:
                raise PassError(
                    f"layer {site.name}: {self.spec()} asks for ranks {own_ranks} but the layer was trained "
                    f"by deeptwist with ranks {projection.ranks}; drop the rank options of {self.name}"
                )
        return entry
