"""The lowering passes by form: the `lower` pass with its forms fixed, under the names pipelines use.

    lower-conv-tucker          tucker-chain
    lower-conv-svd             svd-conv (form=conv) or svd-im2col (form=im2col)
    lower-conv-tiled-lowrank   tiled-lowrank
    lower-conv-cp              cp-chain
    lower-linear-svd           svd-linear
"""
from __future__ import annotations

from dataclasses import dataclass

from twistc.decomp import FORMS
from twistc.decomp.svd import ORDERS
from twistc.passes.lower import Lowering, check_layout
from twistc.passes.lowrank import LowRankOptions, check_choice
from twistc.pipeline import register
from twistc.plan import Layout

SVD_IM2COL, TILED = FORMS["svd-im2col"][1].methods, FORMS["tiled-lowrank"][1].methods


@register
@dataclass(frozen=True)
class LowerConvTucker(Lowering):
    name = "lower-conv-tucker"
    summary = "rewrite each kh x kw conv as 1x1 -> kh x kw -> 1x1 (Tucker-2), exactly at the chosen ranks"

    def allowed(self):
        return ("tucker-chain",)


@register
@dataclass(frozen=True)
class LowerConvSvd(Lowering):
    name = "lower-conv-svd"
    run_defaults = ("ratio", "fit", "order")
    summary = "rewrite each conv through a truncated SVD of its lowered matrix (conv pair or im2col + GEMM)"
    option_help = {**LowRankOptions.option_help, "form": "conv (a kxk conv, then a 1x1) or im2col",
                   "order": "column order of the lowered matrix, channel-major or tap-major",
                   "im2col": f"form=im2col: {', '.join(SVD_IM2COL)}"}

    form: str = "conv"
    order: str = "channel-major"
    im2col: str = SVD_IM2COL[0]

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.form, ("conv", "im2col"), "form")
        check_choice(self.order, ORDERS, "order")
        check_choice(self.im2col, SVD_IM2COL, "im2col")

    def allowed(self):
        return (f"svd-{self.form}",)

    def method(self):
        return self.im2col

    def kind_reason(self, kind, takes):
        if self.form == "conv":
            return super().kind_reason(kind, takes)
        return f"{kind}: {self.name}{{form={self.form}}} lowers {' and '.join(takes)} layers"

    def layout(self):
        return Layout(self.order)


@register
@dataclass(frozen=True)
class LowerConvTiledLowrank(Lowering):
    name = "lower-conv-tiled-lowrank"
    run_defaults = ("ratio", "fit", "order", "tile", "grid")
    summary = "rewrite each conv as per-tile low-rank products (tiled SVD of its lowered matrix)"
    option_help = {**LowRankOptions.option_help, "tile": "tile shape HxW (ragged edges allowed)",
                   "grid": "tile grid RxC", "order": "column order, channel-major or tap-major",
                   "im2col": ", ".join(TILED)}

    tile: tuple[int, ...] | None = None
    grid: tuple[int, ...] | None = None
    order: str = "channel-major"
    im2col: str = "auto"  # channel-blocks where the tiles fit it, else onehot: the fastest exact forms

    def __post_init__(self):
        super().__post_init__()
        check_layout(self.order, self.tile, self.grid)
        check_choice(self.im2col, TILED, "im2col")

    def allowed(self):
        return ("tiled-lowrank",)

    def method(self):
        return self.im2col

    def layout(self):
        return Layout(self.order, self.tile, self.grid if self.tile is None else None)


@register
@dataclass(frozen=True)
class LowerConvCp(Lowering):
    name = "lower-conv-cp"
    summary = "rewrite each kh x kw conv as 1x1 -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1 (CP)"

    def allowed(self):
        return ("cp-chain",)


@register
@dataclass(frozen=True)
class LowerLinearSvd(Lowering):
    name = "lower-linear-svd"
    summary = "rewrite each Linear layer as Linear (in->r) then Linear (r->out), exactly at the chosen rank"

    def allowed(self):
        return ("svd-linear",)
