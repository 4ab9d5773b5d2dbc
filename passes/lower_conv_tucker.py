"""lower-conv-tucker: rewrite a kh x kw conv as its Tucker-2 chain.

    W[T,S,kh,kw] ~= G[R_out,R_in,kh,kw] x_0 U_out[T,R_out] x_1 U_in[S,R_in]
    conv(x, W) + b  ->  conv1x1(conv_khxkw(conv1x1(x, U_in^T), G), U_out) + b

Layers trained by DeepTwist take their ranks from the projection, which first applies its final
projection (idempotent), so the rewrite is exact; other layers need ranks from the options or the
plan. The core keeps the original stride, padding (mode included) and dilation; the bias moves to
the last 1x1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from twistc.convs import lowered_path, replace_with_chain
from twistc.ops import TuckerConv
from twistc.pipeline import PassResult
from twistc.passes.lowrank import LowRankOptions


@dataclass(frozen=True)
class LowerConvTucker(LowRankOptions):
    name = "lower-conv-tucker"
    summary = "rewrite each kh x kw conv as 1x1 -> kh x kw -> 1x1 (Tucker-2), exactly at the chosen ranks"
    kinds = ("Conv2d", "Conv1d")

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        def rewrite(site, entry):
            factors = self.factors(gm, site, entry)
            module = TuckerConv(site.conv_args(), factors.u_out, factors.core, factors.u_in, site.bias(gm))
            replace_with_chain(gm, site, lowered_path(gm, site, "tucker"), module)

        return self.lower_each(gm, "tucker", "tucker-chain", rewrite)
