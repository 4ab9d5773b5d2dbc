"""lower-conv-tiled-lowrank: tiled low-rank products in place of a conv.

    K[T, S*kh*kw] = [K_ij],  K_ij ~= U_ij V_ij     Y_i = sum_j U_ij (V_ij X_j),  X = im2col(x)

Tiles come from `tile=HxW` (ragged edge tiles allowed) or `grid=RxC` on the lowered matrix in the
column `order`. All tiles run as two batched matrix products; ragged tiles are zero-padded to the
common tile shape, which is exact. Two forms need no im2col matrix, for tiles that line up with
the input channels:
  - `im2col=channel-blocks`: under channel-major order, tiles of width m*kh*kw are m whole input
    channels with all their taps; the V products become one grouped kh x kw conv (ops.ChannelBlockConv).
  - `im2col=tap-blocks`: under tap-major order, tiles whose width divides the input channels are
    channel blocks of one kernel tap; the V products become grouped 1x1 convs on strided slices of
    the input (ops.TapBlockGemm).
In both, the U products are one 1x1 conv grouped by row tile. The default, `im2col=auto`, takes
channel-blocks where the tiles fit it and one-hot im2col elsewhere (see tools/bench_im2col.py).
Layers trained by DeepTwist with decomp=tiled-svd take rank, order and tiles from the projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from twistc.convs import im2col_for, lowered_path, replace_with_module
from twistc.decomp.svd import ORDERS, lowered
from twistc.decomp.tiling import tiled_svd
from twistc.errors import PassError, SpecError
from twistc.ops import ChannelBlockConv, Im2Col, LowRankGemm, TapBlockGemm
from twistc.pipeline import PassResult
from twistc.plan import Layout
from twistc.passes.lowrank import LowRankOptions, check_choice, check_pair

BLOCK_FORMS = {"channel-blocks": ChannelBlockConv, "tap-blocks": TapBlockGemm}
IM2COL = ("auto", *Im2Col.METHODS, *BLOCK_FORMS)


@dataclass(frozen=True)
class LowerConvTiledLowrank(LowRankOptions):
    name = "lower-conv-tiled-lowrank"
    summary = "rewrite each conv as per-tile low-rank products (tiled SVD of its lowered matrix)"
    option_help = {**LowRankOptions.option_help, "tile": "tile shape HxW (ragged edges allowed)",
                   "grid": "tile grid RxC", "order": "column order, channel-major or tap-major",
                   "im2col": "auto, onehot, slices, unfold, channel-blocks or tap-blocks"}

    tile: tuple[int, ...] | None = None
    grid: tuple[int, ...] | None = None
    order: str = "channel-major"
    im2col: str = "auto"  # channel-blocks where the tiles fit it, else onehot: the fastest exact forms

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.order, ORDERS, "order")
        check_choice(self.im2col, IM2COL, "im2col")
        if self.tile is not None and self.grid is not None:
            raise SpecError("give tile=HxW or grid=RxC, not both")
        check_pair(self.tile, "tile")
        check_pair(self.grid, "grid")

    def layout(self) -> Layout:
        return Layout(self.order, self.tile, self.grid if self.tile is None else None)

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        def rewrite(site, entry):
            k = lowered(site.weight(gm), entry.order)
            factors = tiled_svd(k, entry.tile_grid(tuple(k.shape)), entry.ranks[0])
            form = self.im2col
            if form == "auto":
                fits = ChannelBlockConv.fits(entry.order, site.geometry.kernel, factors.grid)
                form = "channel-blocks" if fits else "onehot"
            if form in BLOCK_FORMS:
                try:
                    module = BLOCK_FORMS[form](im2col_for(site, entry.order, "slices"), factors, site.bias(gm))
                except ValueError as e:
                    raise PassError(f"layer {site.name}: {e}; use im2col=onehot for it") from None
            else:
                module = LowRankGemm(im2col_for(site, entry.order, form), factors, site.bias(gm))
            replace_with_module(gm, site, lowered_path(gm, site, "tiled"), module)
            return form

        return self.lower_each(gm, "tiled-svd", "tiled-lowrank", rewrite)
