import pytest
import torch

from twistc.decomp.svd import lowered, truncated_svd, unlowered
from twistc.decomp.tiling import TileGrid, rank_for_ratio, tiled_svd
from twistc.errors import RankError


@pytest.mark.parametrize("order", ["channel-major", "tap-major"])
def test_lowered_round_trip_and_orders(order):
    w = torch.randn(5, 3, 2, 4)
    k = lowered(w, order)
    assert k.shape == (5, 24)
    assert torch.equal(unlowered(k, tuple(w.shape), order), w)
    if order == "channel-major":
        assert torch.equal(k, w.reshape(5, -1))
    else:  # the first S columns are tap (0, 0) across all input channels
        assert torch.equal(k[:, :3], w[:, :, 0, 0])


def test_channel_major_matches_unfold():
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    cols = torch.nn.functional.unfold(x, 3)
    torch.testing.assert_close((lowered(w) @ cols).reshape(1, 4, 4, 4), torch.nn.functional.conv2d(x, w),
                               atol=1e-5, rtol=0)


def test_truncated_svd_is_optimal_and_full_rank_exact():
    m = torch.randn(12, 30)
    torch.testing.assert_close(truncated_svd(m, 12).reconstruct(), m, atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(m.double())
    err = (truncated_svd(m, 4).reconstruct() - m).double().norm()
    torch.testing.assert_close(err, s[4:].norm(), atol=1e-5, rtol=1e-5)  # Eckart-Young


def test_tile_grid_from_tile_and_from_grid_with_ragged_edges():
    g = TileGrid.from_tile((10, 7), (4, 3))
    assert g.rows == ((0, 4), (4, 8), (8, 10)) and g.cols == ((0, 3), (3, 6), (6, 7))
    assert g.shape == (3, 3) and g.tile == (4, 3) and g.ragged
    e = TileGrid.from_grid((64, 576), (2, 18))
    assert e.tile == (32, 32) and not e.ragged
    with pytest.raises(RankError):
        TileGrid.from_grid((4, 4), (5, 1))


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (4, 4)])
def test_tiled_svd_full_rank_exact_and_rank_bounded_per_tile(grid):
    m = torch.randn(16, 36)
    g = TileGrid.from_grid(tuple(m.shape), grid)
    torch.testing.assert_close(tiled_svd(m, g, min(g.tile)).reconstruct(), m, atol=1e-5, rtol=0)
    approx = tiled_svd(m, g, 2).reconstruct()
    for _, _, rs, cs in g.tiles():
        assert torch.linalg.matrix_rank(approx[rs, cs]) <= 2


def test_ragged_tiles_keep_rank_capped():
    m = torch.randn(10, 7)
    g = TileGrid.from_tile((10, 7), (4, 3))
    f = tiled_svd(m, g, 3)
    assert f.factors[2, 2].rank == 1  # a 2x1 edge tile has rank at most 1
    torch.testing.assert_close(f.reconstruct(), m, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tile,ratio,rank", [((64, 64), 2, 16), ((32, 32), 2, 8), ((16, 16), 2, 4), ((8, 8), 2, 2),
                                             ((64, 64), 4, 8), ((32, 32), 4, 4), ((16, 16), 4, 2), ((8, 8), 4, 1)])
def test_rank_for_ratio_reproduces_the_papers_ranks(tile, ratio, rank):
    g = TileGrid.from_tile((64, 576), tile)
    assert rank_for_ratio(g, ratio) == rank
    assert 64 * 576 / g.factor_params(rank) >= ratio


def test_rank_for_ratio_errors():
    with pytest.raises(RankError, match="> 1"):
        rank_for_ratio(TileGrid.from_grid((8, 8), (1, 1)), 1)
    with pytest.raises(RankError, match="out of reach"):
        rank_for_ratio(TileGrid.from_tile((8, 8), (2, 2)), 4)
