"""lower-conv-tiled-lowrank: im2col, then tiled low-rank matrix products.

    K[T, S*kh*kw] = [K_ij],  K_ij ~= U_ij V_ij     Y_i = sum_j U_ij (V_ij X_j),  X = im2col(x)

Tiles come from `tile=HxW` (ragged edge tiles allowed) or `grid=RxC` on the lowered matrix in the
column `order`. All tiles run as two batched matrix products; ragged tiles are zero-padded to the
common tile shape, which is exact. `im2col=tap-blocks` needs no im2col matrix: under tap-major
order, tiles whose width divides the input channels are channel blocks of one kernel tap, and their
products become grouped 1x1 convs on strided slices of the input (ops.TapBlockGemm). Layers trained
by DeepTwist with decomp=tiled-svd take rank, order and tiles from the projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from twistc.convs import im2col_for, lowered_path, replace_with_module
from twistc.decomp.svd import ORDERS, lowered
from twistc.decomp.tiling import tiled_svd
from twistc.errors import PassError, SpecError
from twistc.ops import Im2Col, LowRankGemm, TapBlockGemm
from twistc.pipeline import PassResult
from twistc.plan import Layout
from twistc.selection import LowRankOptions, check_choice

IM2COL = (*Im2Col.METHODS, "tap-blocks")


@dataclass(frozen=True)
class LowerConvTiledLowrank(LowRankOptions):
    name = "lower-conv-tiled-lowrank"
    summary = "rewrite each conv as im2col + per-tile low-rank GEMMs (tiled SVD of its lowered matrix)"

    tile: tuple[int, ...] | None = None
    grid: tuple[int, ...] | None = None
    order: str = "channel-major"
    im2col: str = "onehot"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.order, ORDERS, "order")
        check_choice(self.im2col, IM2COL, "im2col")
        if self.tile is not None and self.grid is not None:
            raise SpecError("give tile=HxW or grid=RxC, not both")

    def layout(self) -> Layout:
        return Layout(self.order, self.tile, self.grid if self.tile is None else None)

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        def rewrite(site, entry):
            k = lowered(site.weight(gm), entry.order)
            factors = tiled_svd(k, entry.tile_grid(tuple(k.shape)), entry.ranks[0])
            if self.im2col == "tap-blocks":
                try:
                    module = TapBlockGemm(im2col_for(site, entry.order, "slices"), factors, site.bias(gm))
                except ValueError as e:
                    raise PassError(f"layer {site.name}: {e}; use im2col=onehot for it") from None
            else:
                module = LowRankGemm(im2col_for(site, entry.order, self.im2col), factors, site.bias(gm))
            replace_with_module(gm, site, lowered_path(gm, site, "tiled"), module)

        return self.lower_each(gm, "tiled-svd", "tiled-lowrank", rewrite)
