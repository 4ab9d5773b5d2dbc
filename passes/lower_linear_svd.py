"""lower-linear-svd: rewrite a Linear layer as two, through the truncated SVD of its weight.

    W[out, in] ~= U[out, r] V[r, in]
    x W^T + b  ->  (x V^T) U^T + b      Linear(in -> r, no bias), then Linear(r -> out, with the bias)

Ranks come from a DeepTwist projection (trained with decomp=svd), the plan, or the options (ratio,
ranks, energy, rank=vbmf), as for the convs; `layers=` patterns select by the layer's name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from twistc.convs import lowered_path, replace_with_chain
from twistc.ops import SvdLinear
from twistc.pipeline import PassResult
from twistc.passes.lowrank import LowRankOptions


@dataclass(frozen=True)
class LowerLinearSvd(LowRankOptions):
    name = "lower-linear-svd"
    summary = "rewrite each Linear layer as Linear (in->r) then Linear (r->out), exactly at the chosen rank"
    kinds = ("Linear",)

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        def rewrite(site, entry):
            factors = self.factors(gm, site, entry).low_rank
            module = SvdLinear(factors.u, factors.v, site.bias(gm))
            replace_with_chain(gm, site, lowered_path(gm, site, "svd"), module)

        return self.lower_each(gm, "svd", "svd-linear", rewrite)
