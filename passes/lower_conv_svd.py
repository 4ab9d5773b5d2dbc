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

from twistc.convs import finalize_projection, lowered_path, replace_with_chain, replace_with_module
from twistc.decomp.svd import ORDERS, lowered
from twistc.decomp.tiling import TileGrid, tiled_svd
from twistc.ops import Im2Col, LowRankGemm, SvdConv
from twistc.pipeline import PassResult
from twistc.plan import Layout
from twistc.selection import LowRankOptions, check_choice, record_lowering

FORMS = {"conv": "svd-conv", "im2col": "svd-im2col"}
IM2COL = ("onehot", "unfold")  # onehot measured fastest: results/bench_im2col


@dataclass(frozen=True)
class LowerConvSvd(LowRankOptions):
    name = "lower-conv-svd"
    summary = "rewrite each conv through a truncated SVD of its lowered matrix (conv pair or im2col + GEMM)"

    form: str = "conv"
    order: str = "channel-major"
    im2col: str = "onehot"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.form, tuple(FORMS), "form")
        check_choice(self.order, ORDERS, "order")
        check_choice(self.im2col, IM2COL, "im2col")

    def layout(self) -> Layout:
        return Layout(self.order)

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        state, sites = self.sites(gm)
        rewrites = 0
        for site in sites:
            entry = self.lowering_entry(gm, site, state, "svd", FORMS[self.form])
            if isinstance(entry, str):
                state.skip(site.name, entry)
                continue
            finalize_projection(gm, site)
            k = lowered(site.weight(gm), entry.order)
            factors = tiled_svd(k, TileGrid.from_grid(tuple(k.shape), (1, 1)), entry.ranks[0])
            if self.form == "conv":
                f = factors.factors[0, 0]
                module = SvdConv(site.conv_args(), site.geometry.kernel, f.u, f.v, site.bias(gm), entry.order)
                replace_with_chain(gm, site, lowered_path(gm, site, "svd"), module)
            else:
                im2col = Im2Col(site.geometry.in_channels, site.geometry.kernel, site.stride, site.padding,
                                site.dilation, site.padding_mode, entry.order, self.im2col)
                replace_with_module(gm, site, lowered_path(gm, site, "svd"), LowRankGemm(im2col, factors, site.bias(gm)))
            record_lowering(state, site, entry)
            rewrites += 1
        return PassResult(gm, rewrites > 0, rewrites)
