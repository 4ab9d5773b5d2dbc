"""Truncated SVD of the lowered (im2col) matrix K[T, S*kh*kw], whole (`svd`) or per tile (`tiled-svd`).

SVD is tiled SVD on the 1x1 grid; it also chooses ranks by energy and has two lowered forms (a
kh x kw conv and a 1x1 conv, or im2col and two matrix products).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from twistc.decomp.base import DEFAULT_RATIO, Decomposition, Form, conv_class, copy_into, pointwise
from twistc.decomp.im2col import ChannelBlockConv, Im2Col, LowRankGemm, TapBlockGemm
from twistc.decomp.cost import lowrank_cost
from twistc.decomp.rank import rank_for_energy, vbmf_weakened
from twistc.decomp.svd import LowRank, lowered, singular_energies, truncated_svd, truncation_errors, unlowered
from twistc.decomp.tiling import TileGrid, TiledLowRank, rank_for_ratio, tiled_svd
from twistc.decomp.whiten import whitened_svd, whitened_truncation_errors
from twistc.errors import RankError, SpecError


def check_matrix_rank(grid: TileGrid, ranks: tuple[int, ...]) -> int:
    top = min(grid.tile)
    if len(ranks) != 1 or not 1 <= ranks[0] <= top:
        raise RankError(f"rank {'x'.join(map(str, ranks))} is outside 1..{top} (full rank of a {grid.tile[0]}x"
                        f"{grid.tile[1]} tile)")
    return int(ranks[0])


@dataclass(frozen=True)
class LoweredLowRank:
    """Factors of a kernel's lowered matrix (whole, or per tile); `reconstruct()` gives the kernel."""

    low_rank: LowRank | TiledLowRank
    shape: tuple[int, ...]
    order: str

    def reconstruct(self):
        return unlowered(self.low_rank.reconstruct(), self.shape, self.order)

    def tiled(self) -> TiledLowRank:
        """The factors as tiles (one tile when they are whole)."""
        if isinstance(self.low_rank, TiledLowRank):
            return self.low_rank
        shape = (self.low_rank.u.shape[0], self.low_rank.v.shape[1])
        return TiledLowRank(TileGrid.of(shape, None, None), {(0, 0): self.low_rank}, shape)


class SvdConv(nn.Sequential):
    """K ~= U V as two convs: kh x kw (S->r, the rows of V as kernels), then 1x1 (r->T, U, the bias)."""

    def __init__(self, conv_args: dict, kernel: tuple[int, ...], u: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor | None, order: str):
        r, s = v.shape[0], v.shape[1] // math.prod(kernel)
        like = {"dtype": v.dtype, "device": v.device}
        conv = conv_class(len(kernel))
        super().__init__()
        self.add_module("reduce", conv(s, r, tuple(kernel), bias=False, **conv_args, **like))
        self.add_module("expand", conv(r, u.shape[0], 1, bias=bias is not None, **like))
        copy_into(self.reduce.weight, unlowered(v, (r, s, *kernel), order))
        copy_into(self.expand.weight, pointwise(u, len(kernel)))
        if bias is not None:
            copy_into(self.expand.bias, bias)


class SvdLinear(nn.Sequential):
    """W ~= U V as two Linear layers: in -> r (V), then r -> out (U, the bias)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
        like = {"dtype": u.dtype, "device": u.device}
        super().__init__()
        self.add_module("reduce", nn.Linear(v.shape[1], v.shape[0], bias=False, **like))
        self.add_module("expand", nn.Linear(u.shape[1], u.shape[0], bias=bias is not None, **like))
        copy_into(self.reduce.weight, v)
        copy_into(self.expand.weight, u)
        if bias is not None:
            copy_into(self.expand.bias, bias)


IM2COL = Im2Col.METHODS
BLOCKS = {"channel-blocks": ChannelBlockConv, "tap-blocks": TapBlockGemm}


def _svd_conv(g, f: LoweredLowRank, bias, method=None):
    return SvdConv(g.conv_args(), g.spatial_kernel, f.low_rank.u, f.low_rank.v, bias, f.order), None


def _svd_linear(g, f: LoweredLowRank, bias, method=None):
    return SvdLinear(f.low_rank.u, f.low_rank.v, bias), None


def _svd_im2col(g, f: LoweredLowRank, bias, method=IM2COL[0]):
    return LowRankGemm(Im2Col.of(g, f.order, method), f.tiled(), bias), method


def _tiled_lowrank(g, f: LoweredLowRank, bias, method="auto"):
    tiles = f.tiled()
    if method == "auto":
        method = "channel-blocks" if ChannelBlockConv.fits(f.order, g.kernel, tiles.grid) else IM2COL[0]
    if method not in BLOCKS:
        return LowRankGemm(Im2Col.of(g, f.order, method), tiles, bias), method
    try:
        return BLOCKS[method](Im2Col.of(g, f.order, "slices"), tiles, bias), method
    except ValueError as e:
        raise ValueError(f"{e}; use im2col=onehot for it") from None


class TiledSvd(Decomposition):
    name = "tiled-svd"
    summary = "truncated SVD of each tile of the lowered matrix, lowered to im2col and tiled GEMMs or grouped convs"
    forms = (Form("tiled-lowrank", ("Conv2d",), _tiled_lowrank, "im2col and tiled GEMMs, or grouped convs",
                  chain=False, methods=("auto", *IM2COL, *BLOCKS)),)
    matrix = True
    tiled = True

    def grid(self, g, layout) -> TileGrid:
        """The tiles of the layer's lowered matrix under `layout` (a Layout or a LayerPlan)."""
        return TileGrid.of((g.out_channels, g.in_channels * g.taps), layout.tile, layout.grid)

    def choose_ranks(self, weight, g, request, layout):
        grid = self.grid(g, layout)
        if request.ranks is not None:
            return (check_matrix_rank(grid, request.ranks),), {}
        if request.energy is not None or request.vbmf is not None:
            raise SpecError("energy= and rank=vbmf choose ranks for tucker and svd only; give ratio or ranks "
                            f"for {self.name}")
        ratio = request.ratio if request.ratio is not None else DEFAULT_RATIO
        rank, least = rank_for_ratio(grid, ratio), request.matrix_floor(min(grid.tile))
        if rank < least:
            raise RankError(f"ratio {ratio:g} is out of reach keeping rank {least}: rank {least} compresses it "
                            f"only {grid.rows[-1][1] * grid.cols[-1][1] / grid.factor_params(least):.2f}x")
        return (rank,), {"ratio": ratio}

    def check_ranks(self, g, entry):
        return (check_matrix_rank(self.grid(g, entry), tuple(entry.ranks)),)

    def full_ranks(self, g, entry):
        return (min(self.grid(g, entry).tile),)

    def fit(self, weight, entry, stats=None):
        k = lowered(weight, entry.order)
        return LoweredLowRank(tiled_svd(k, entry.tile_grid(tuple(k.shape)), entry.ranks[0]), tuple(weight.shape),
                              entry.order)

    def random_factors(self, g, entry, rand):
        grid, r = self.grid(g, entry), entry.ranks[0]
        tiles = {}
        for i, j, rows, cols in grid.tiles():
            h, w = rows.stop - rows.start, cols.stop - cols.start
            tiles[i, j] = LowRank(rand(h, min(r, h, w)), rand(min(r, h, w), w))
        shape = (g.out_channels, g.in_channels * g.taps)
        return LoweredLowRank(TiledLowRank(grid, tiles, shape), (g.out_channels, g.in_channels, *g.spatial_kernel),
                              entry.order or "channel-major")

    def cost(self, g, entry):
        return lowrank_cost(g, self.grid(g, entry).factor_params(entry.ranks[0]))

    def tiling(self, g, entry):
        grid = self.grid(g, entry)
        return {"grid": list(grid.shape), "tile": list(grid.tile),
                "ragged_edges": "zero-padded to the common tile shape" if grid.ragged else None}


class Svd(TiledSvd):
    name = "svd"
    summary = "truncated SVD of the lowered matrix, lowered to a kh x kw conv and a 1x1 conv (or im2col and GEMMs)"
    kinds = ("Conv2d", "Conv1d", "Linear")
    forms = (Form("svd-conv", ("Conv2d", "Conv1d"), _svd_conv, "kh x kw conv -> 1x1 conv"),
             Form("svd-im2col", ("Conv2d",), _svd_im2col, "im2col -> two matrix products", chain=False,
                  methods=IM2COL),
             Form("svd-linear", ("Linear",), _svd_linear, "Linear (in->r) -> Linear (r->out)"))
    tiled = False
    data_aware = True

    def grid(self, g, layout) -> TileGrid:
        return TileGrid.of((g.out_channels, g.in_channels * g.taps), None, None)

    def choose_ranks(self, weight, g, request, layout):
        least = request.matrix_floor(min(g.out_channels, g.in_channels * g.taps))
        if request.energy is not None:
            spectrum = singular_energies(lowered(weight, layout.order))
            return (max(least, rank_for_energy(spectrum, request.energy)),), {"energy": request.energy}
        if request.vbmf is not None:
            return (max(least, vbmf_weakened(lowered(weight, layout.order), request.vbmf)),), {}
        return super().choose_ranks(weight, g, request, layout)

    def rank_grid(self, g, steps, rounded):
        top = min(g.out_channels, g.in_channels * g.taps)
        return [(rounded(top * k / steps, top),) for k in range(1, steps)]

    def fit(self, weight, entry, stats=None):
        k = lowered(weight, entry.order)
        low = None
        if entry.fit == "activation" and stats is not None:
            low = whitened_svd(k, stats.in_order(tuple(weight.shape), entry.order), entry.ranks[0])
        return LoweredLowRank(low or truncated_svd(k, entry.ranks[0]), tuple(weight.shape), entry.order)

    def random_factors(self, g, entry, rand):
        r = entry.ranks[0]
        return LoweredLowRank(LowRank(rand(g.out_channels, r), rand(r, g.in_channels * g.taps)),
                              (g.out_channels, g.in_channels, *g.spatial_kernel), entry.order or "channel-major")

    def errors(self, weight, entries, stats=None):
        """Each entry's relative error, from one spectrum per column order and fit among the entries."""
        out: list[float | None] = [None] * len(entries)
        aware = lambda e: e.fit == "activation" and stats is not None  # noqa: E731
        for order, data in {(e.order, aware(e)) for e in entries}:
            mine = [i for i, e in enumerate(entries) if (e.order, aware(e)) == (order, data)]
            k, ranks = lowered(weight, order), [entries[i].ranks[0] for i in mine]
            errors = ((whitened_truncation_errors(k, stats.in_order(tuple(weight.shape), order), ranks) if data
                       else None) or truncation_errors(k, ranks))
            for i, error in zip(mine, errors):
                out[i] = error
        return out
