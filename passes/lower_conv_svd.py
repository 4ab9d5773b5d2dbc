"""lower-conv-svd: rewrite a conv through the SVD of its lowered (im2col) matrix.

    K[T, S*kh*kw] = lowered(W, order) ~= U[T, r] V[r, S*kh*kw]
    form=conv:    conv_khxkw(x, unlowered(V)) -> conv1x1(., U) + b
    form=im2col:  U (V im2col(x)) + b, reshaped to [B, T, Hout, Wout]

Exact at the chosen rank for both forms. Layers trained by DeepTwist with decomp=svd take their
rank and column order from the projection; other layers need a rank from the options or the plan.
`im2col` picks the im2col implementation of form=im2col (see ops.Im2Col).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from twistc.convs import im2col_for, lowered_path, replace_with_chain, replace_with_module
from twistc.decomp import DECOMPOSITIONS
from twistc.decomp.svd import ORDERS, lowered
from twistc.decomp.tiling import TiledLowRank, tiled_svd
from twistc.ops import Im2Col, LowRankGemm, SvdConv
from twistc.pipeline import PassResult
from twistc.plan import Layout
from twistc.passes.lowrank import LowRankOptions, check_choice

FORMS = {"conv": "svd-conv", "im2col": "svd-im2col"}


@dataclass(frozen=True)
class LowerConvSvd(LowRankOptions):
    name = "lower-conv-svd"
    summary = "rewrite each conv through a truncated SVD of its lowered matrix (conv pair or im2col + GEMM)"
    option_help = {**LowRankOptions.option_help, "form": "conv (a kxk conv, then a 1x1) or im2col",
                   "order": "column order of the lowered matrix, channel-major or tap-major",
                   "im2col": "form=im2col: onehot, slices or unfold"}

    kinds = ("Conv2d", "Conv1d")  # a Conv1d takes form=conv

    form: str = "conv"
    order: str = "channel-major"
    im2col: str = "onehot"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.form, tuple(FORMS), "form")
        check_choice(self.order, ORDERS, "order")
        check_choice(self.im2col, Im2Col.METHODS, "im2col")

    def takes(self) -> tuple[str, ...]:
        return DECOMPOSITIONS["svd"].kinds_of(FORMS[self.form])

    def kind_reason(self, kind: str, takes: tuple[str, ...]) -> str:
        if self.form == "conv":
            return super().kind_reason(kind, takes)
        return f"{kind}: {self.name}{{form={self.form}}} lowers {' and '.join(takes)} layers"

    def layout(self) -> Layout:
        return Layout(self.order)

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        def rewrite(site, entry):
            k = lowered(site.weight(gm), entry.order)
            path = lowered_path(gm, site, "svd")
            if self.form == "conv":
                f = self.factors(gm, site, entry).low_rank
                module = SvdConv(site.conv_args(), site.kernel, f.u, f.v, site.bias(gm), entry.order)
                replace_with_chain(gm, site, path, module)
            else:
                grid = entry.tile_grid(tuple(k.shape))
                factors = (TiledLowRank(grid, {(0, 0): self.factors(gm, site, entry).low_rank}, tuple(k.shape))
                           if entry.fit == "activation" else tiled_svd(k, grid, entry.ranks[0]))
                module = LowRankGemm(im2col_for(site, entry.order, self.im2col), factors, site.bias(gm))
                replace_with_module(gm, site, path, module)
                return self.im2col

        return self.lower_each(gm, "svd", FORMS[self.form], rewrite)
