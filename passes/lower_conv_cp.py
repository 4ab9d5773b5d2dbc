"""lower-conv-cp: rewrite a kh x kw conv as its CP chain (Lebedev et al., 2015).

    W ~= sum_r U_T[:,r] o U_S[:,r] o U_h[:,r] o U_w[:,r]
    conv(x, W) + b  ->  conv1x1(dw_1xkw(dw_khx1(conv1x1(x, U_S^T), U_h), U_w), U_T) + b

Ranks come from a DeepTwist projection (trained with decomp=cp), the plan, or the options (ratio,
ranks). The record keeps the fit's relative error (`approx_error`); a fit that removes more than half
of the kernel's norm is reported as a warning, since CP at low rank often fits poorly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from twistc.convs import lowered_path, replace_with_chain
from twistc.decomp.cp import CpFactors, cp
from twistc.ops import CpConv
from twistc.pipeline import PassResult
from twistc.passes.lowrank import LowRankOptions
from twistc.state import state_of

log = logging.getLogger(__name__)
POOR_FIT = 0.5


@dataclass(frozen=True)
class LowerConvCp(LowRankOptions):
    name = "lower-conv-cp"
    summary = "rewrite each kh x kw conv as 1x1 -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1 (CP)"

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        state = state_of(gm)

        def rewrite(site, entry):
            weight = site.weight(gm)
            # a DeepTwist-trained kernel is its final projection's reconstruction: reuse those factors,
            # since ALS refitting them need not find them again
            fitted = site.projection.fitted if site.projection is not None else None
            factors = fitted if isinstance(fitted, CpFactors) else cp(weight, entry.ranks[0])
            error = float(torch.linalg.vector_norm(weight - factors.reconstruct()) / torch.linalg.vector_norm(weight))
            state.layers[site.name].approx_error = error
            if error > POOR_FIT:
                log.warning("warning: layer %s: CP at rank %d fits poorly (it removes %.0f%% of the kernel's norm); "
                            "raise the rank or use tucker", site.name, entry.ranks[0], 100 * error)
            module = CpConv(site.conv_args(), factors.out, factors.inp, factors.rows, factors.cols, site.bias(gm))
            replace_with_chain(gm, site, lowered_path(gm, site, "cp"), module)

        return self.lower_each(gm, "cp", "cp-chain", rewrite)
