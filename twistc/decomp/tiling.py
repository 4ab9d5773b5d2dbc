"""Tiled SVD: split a matrix into a grid of tiles and approximate each tile by its own SVD.

    K = [K_ij],  K_ij[h_i, w_j] ~= U_ij[h_i, r] V_ij[r, w_j],  one rank r for all tiles

A grid comes from a tile shape (edge tiles may be smaller: ragged) or from a grid shape (tiles as
even as possible). A ragged tile whose sides are below r keeps rank min(r, h_i, w_j); lowered
forms zero-pad such tiles to the common tile shape, which leaves the products unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from twistc.decomp.svd import LowRank, truncated_svd
from twistc.errors import RankError

Tensor = torch.Tensor


def _spans_of_size(total: int, size: int) -> tuple[tuple[int, int], ...]:
    return tuple((start, min(start + size, total)) for start in range(0, total, size))


def _even_spans(total: int, parts: int) -> tuple[tuple[int, int], ...]:
    bounds = [round(i * total / parts) for i in range(parts + 1)]
    return tuple((a, b) for a, b in zip(bounds, bounds[1:]))


@dataclass(frozen=True)
class TileGrid:
    rows: tuple[tuple[int, int], ...]  # [start, stop) of each row tile
    cols: tuple[tuple[int, int], ...]

    @classmethod
    def from_tile(cls, shape: tuple[int, int], tile: tuple[int, int]) -> "TileGrid":
        if min(tile) < 1:
            raise RankError(f"tile sides must be >= 1, got {tile}")
        return cls(_spans_of_size(shape[0], tile[0]), _spans_of_size(shape[1], tile[1]))

    @classmethod
    def from_grid(cls, shape: tuple[int, int], grid: tuple[int, int]) -> "TileGrid":
        if not (1 <= grid[0] <= shape[0] and 1 <= grid[1] <= shape[1]):
            raise RankError(f"grid {grid[0]}x{grid[1]} does not fit a {shape[0]}x{shape[1]} matrix")
        return cls(_even_spans(shape[0], grid[0]), _even_spans(shape[1], grid[1]))

    @classmethod
    def of(cls, shape: tuple[int, int], tile: tuple[int, int] | None, grid: tuple[int, int] | None) -> "TileGrid":
        """Tiles of `tile` shape when given, else a `grid` of even tiles (default: one tile)."""
        return cls.from_tile(shape, tile) if tile is not None else cls.from_grid(shape, grid or (1, 1))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.cols)

    @property
    def tile(self) -> tuple[int, int]:
        """The largest (common) tile shape."""
        return max(b - a for a, b in self.rows), max(b - a for a, b in self.cols)

    @property
    def ragged(self) -> bool:
        return len({b - a for a, b in self.rows}) > 1 or len({b - a for a, b in self.cols}) > 1

    def tiles(self):
        for i, (r0, r1) in enumerate(self.rows):
            for j, (c0, c1) in enumerate(self.cols):
                yield i, j, slice(r0, r1), slice(c0, c1)

    def factor_params(self, rank: int) -> int:
        """Parameters of all U and V factors at `rank` (capped per tile at its full rank)."""
        return sum(min(rank, rs.stop - rs.start, cs.stop - cs.start) * (rs.stop - rs.start + cs.stop - cs.start)
                   for _, _, rs, cs in self.tiles())


@dataclass(frozen=True)
class TiledLowRank:
    grid: TileGrid
    factors: dict[tuple[int, int], LowRank]
    shape: tuple[int, int]

    def reconstruct(self) -> Tensor:
        first = next(iter(self.factors.values())).u
        out = torch.zeros(self.shape, dtype=first.dtype, device=first.device)
        for i, j, rs, cs in self.grid.tiles():
            out[rs, cs] = self.factors[i, j].reconstruct()
        return out


def tiled_svd(matrix: Tensor, grid: TileGrid, rank: int) -> TiledLowRank:
    if rank < 1:
        raise RankError(f"rank must be >= 1, got {rank}")
    factors = {(i, j): truncated_svd(matrix[rs, cs], rank) for i, j, rs, cs in grid.tiles()}
    return TiledLowRank(grid, factors, tuple(matrix.shape))


def rank_for_ratio(grid: TileGrid, ratio: float) -> int:
    """Largest rank whose U and V factors are at most 1/ratio of the dense matrix's entries."""
    if not ratio > 1:
        raise RankError(f"ratio must be > 1, got {ratio:g}")
    dense = grid.rows[-1][1] * grid.cols[-1][1]
    best = 0
    top = min(grid.tile)
    for r in range(1, top + 1):
        if dense / grid.factor_params(r) >= ratio:
            best = r
    if best < 1:
        raise RankError(f"ratio {ratio:g} is out of reach: rank 1 on a {grid.shape[0]}x{grid.shape[1]} grid "
                        f"compresses only {dense / grid.factor_params(1):.2f}x")
    return best
