import pytest
import torch

from twistc.decomp.cost import ConvGeometry, conv_cost, tucker_chain_cost
from twistc.decomp.tucker import tucker_ranks_for_energy
from twistc.decomp.rank import (check_tucker_ranks, tucker_max_ranks,
                                tucker_ranks_for_ratio, tucker_ratio)
from twistc.errors import RankError

G = ConvGeometry(64, 32, (3, 3), 1, (16, 16), (8, 8))


def test_conv_cost_counts_weights_and_macs():
    c = conv_cost(G)
    assert c.params == 64 * 32 * 9
    assert c.macs == 64 * 32 * 9 * 64


def test_tucker_cost_first_1x1_at_input_resolution():
    c = tucker_chain_cost(G, (16, 8))
    assert c.params == 32 * 8 + 8 * 16 * 9 + 16 * 64
    assert c.macs == 32 * 8 * 256 + (8 * 16 * 9 + 16 * 64) * 64


@pytest.mark.parametrize("ratio", [1.5, 2, 3, 4, 6.7, 10])
def test_ratio_ranks_are_largest_proportional_pair_meeting_ratio(ratio):
    r_out, r_in = tucker_ranks_for_ratio(G, ratio)
    assert tucker_ratio(G, (r_out, r_in)) >= ratio
    assert r_in == max(1, int(r_out * 32 / 64))
    if r_out < 64:  # one more output rank (with its proportional input rank) misses the ratio
        bigger = (r_out + 1, max(1, int((r_out + 1) * 32 / 64)))
        assert tucker_ratio(G, bigger) < ratio


def test_round_to_gives_multiples():
    r_out, r_in = tucker_ranks_for_ratio(G, 3, round_to=8)
    assert r_out % 8 == 0 and r_in % 8 == 0
    assert tucker_ratio(G, (r_out, r_in)) >= 3


def test_ratio_errors():
    with pytest.raises(RankError, match="> 1"):
        tucker_ranks_for_ratio(G, 1.0)
    tiny = ConvGeometry(4, 3, (1, 3))
    with pytest.raises(RankError, match="out of reach"):
        tucker_ranks_for_ratio(tiny, 50)


def test_explicit_rank_bounds():
    assert tucker_max_ranks(ConvGeometry(64, 3, (3, 3))) == (27, 3)
    assert check_tucker_ranks(G, (64, 32)) == (64, 32)
    for bad in [(0, 4), (4, 0), (65, 4), (4, 33)]:
        with pytest.raises(RankError, match="outside"):
            check_tucker_ranks(G, bad)


def test_energy_ranks():
    u = torch.linalg.qr(torch.randn(16, 16))[0]
    w = torch.einsum("ts,sk->tk", u[:, :3], torch.randn(3, 8 * 9)).reshape(16, 8, 3, 3)
    r_out, r_in = tucker_ranks_for_energy(w, 0.9999)
    assert r_out == 3 and r_in <= 8
    assert tucker_ranks_for_energy(torch.randn(16, 8, 3, 3), 1.0) == (16, 8)
    with pytest.raises(RankError):
        tucker_ranks_for_energy(w, 0)
