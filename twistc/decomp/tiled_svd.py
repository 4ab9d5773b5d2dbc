"""Truncated SVD of the lowered (im2col) matrix K[T, S*kh*kw], whole (`svd`) or per tile (`tiled-svd`).

SVD is tiled SVD on the 1x1 grid; it also chooses ranks by energy and has two lowered forms (a
kh x kw conv and a 1x1 conv, or im2col and two matrix products).
"""
from __future__ import annotations

from dataclasses import dataclass

from twistc.decomp.base import DEFAULT_RATIO, Decomposition
from twistc.decomp.cost import lowrank_cost
from twistc.decomp.rank import rank_for_energy, vbmf_weakened
from twistc.decomp.svd import LowRank, lowered, singular_energies, truncated_svd, truncation_errors, unlowered
from twistc.decomp.tiling import TileGrid, rank_for_ratio, tiled_svd
from twistc.decomp.whiten import whitened_svd, whitened_truncation_errors
from twistc.errors import RankError, SpecError


def check_matrix_rank(grid: TileGrid, ranks: tuple[int, ...]) -> int:
    top = min(grid.tile)
    if len(ranks) != 1 or not 1 <= ranks[0] <= top:
        raise RankError(f"rank {'x'.join(map(str, ranks))} is outside 1..{top} (full rank of a {grid.tile[0]}x"
                        f"{grid.tile[1]} tile)")
    return int(ranks[0])


class TiledSvd(Decomposition):
    name = "tiled-svd"
    summary = "truncated SVD of each tile of the lowered matrix, lowered to im2col and tiled GEMMs or grouped convs"
    lowering_passes = {"tiled-lowrank": "lower-conv-tiled-lowrank"}
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
        rank, least = rank_for_ratio(grid, ratio), min(request.floor[0], min(grid.tile))
        if rank < least:
            raise RankError(f"ratio {ratio:g} is out of reach keeping rank {least}: rank {least} compresses it "
                            f"only {grid.rows[-1][1] * grid.cols[-1][1] / grid.factor_params(least):.2f}x")
        return (rank,), {"ratio": ratio}

    def check_ranks(self, g, entry):
        return (check_matrix_rank(self.grid(g, entry), tuple(entry.ranks)),)

    def reconstruct(self, weight, entry, stats=None):
        k = lowered(weight, entry.order)
        factors = tiled_svd(k, entry.tile_grid(tuple(k.shape)), entry.ranks[0])
        return unlowered(factors.reconstruct(), tuple(weight.shape), entry.order)

    def cost(self, g, entry):
        return lowrank_cost(g, self.grid(g, entry).factor_params(entry.ranks[0]))

    def tiling(self, g, entry):
        grid = self.grid(g, entry)
        return {"grid": list(grid.shape), "tile": list(grid.tile),
                "ragged_edges": "zero-padded to the common tile shape" if grid.ragged else None}


class Svd(TiledSvd):
    name = "svd"
    summary = "truncated SVD of the lowered matrix, lowered to a kh x kw conv and a 1x1 conv (or im2col and GEMMs)"
    lowering_passes = {"svd-conv": "lower-conv-svd", "svd-im2col": "lower-conv-svd", "svd-linear": "lower-linear-svd"}
    kinds = ("Conv2d", "Conv1d", "Linear")
    form_kinds = {"svd-conv": ("Conv2d", "Conv1d"), "svd-im2col": ("Conv2d",), "svd-linear": ("Linear",)}
    tiled = False
    data_aware = True

    def grid(self, g, layout) -> TileGrid:
        return TileGrid.of((g.out_channels, g.in_channels * g.taps), None, None)

    def choose_ranks(self, weight, g, request, layout):
        least = min(request.floor[0], g.out_channels, g.in_channels * g.taps)
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

    def reconstruct(self, weight, entry, stats=None):
        return Decomposition.reconstruct(self, weight, entry, stats)

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


@dataclass(frozen=True)
class LoweredLowRank:
    """Factors of a kernel's lowered matrix; `reconstruct()` gives the kernel."""

    low_rank: LowRank
    shape: tuple[int, ...]
    order: str

    def reconstruct(self):
        return unlowered(self.low_rank.reconstruct(), self.shape, self.order)
