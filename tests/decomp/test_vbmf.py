import pytest
import torch
from torch import nn

import twistc
from twistc.decomp.rank import _vbmf_threshold, vbmf_rank, vbmf_weakened
from twistc.errors import TwistcError
from twistc.pipeline import Pipeline
from twistc.state import state_of


def test_threshold_is_the_known_constant_for_square_matrices():
    assert _vbmf_threshold(1.0) == pytest.approx(2.5129, abs=1e-4)


@pytest.mark.parametrize("rows, cols, rank, noise", [(64, 200, 5, 0.1), (100, 100, 10, 0.5), (200, 64, 8, 1.0),
                                                      (64, 576, 12, 0.3), (30, 30, 3, 0.01)])
def test_vbmf_recovers_the_rank_of_a_low_rank_matrix_in_gaussian_noise(rows, cols, rank, noise):
    g = torch.Generator().manual_seed(rows + rank)
    signal = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    assert vbmf_rank(signal + noise * torch.randn(rows, cols, generator=g)) == rank


def test_pure_noise_has_no_signal_and_weakening_moves_towards_full_rank():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 128, generator=g)
    assert vbmf_rank(noise) == 0 and vbmf_weakened(noise, 0) == 1
    low = torch.randn(64, 4, generator=g) @ torch.randn(4, 128, generator=g) + 0.1 * noise
    assert [vbmf_weakened(low, w) for w in (0, 0.5, 1)] == [4, 34, 64]


def test_rank_vbmf_chooses_each_layers_ranks():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    with torch.no_grad():  # channel ranks 6 (out) and 4 (in), plus a little noise
        core = torch.randn(6, 4, 3, 3)
        conv.weight.copy_(torch.einsum("ab,bcij,dc->adij", torch.randn(32, 6), core, torch.randn(16, 4))
                          + 0.01 * torch.randn(32, 16, 3, 3))
    gm = twistc.trace(nn.Sequential(conv), (torch.randn(1, 16, 8, 8),))
    gm = Pipeline.parse("lower-conv-tucker{rank=vbmf}").run(gm)
    assert state_of(gm).plan.get("0").ranks == (6, 4)
    gm = Pipeline.parse("lower-conv-svd{rank=vbmf}").run(twistc.trace(nn.Sequential(conv), (torch.randn(1, 16, 8, 8),)))
    assert state_of(gm).plan.get("0").ranks == (6,)  # the lowered matrix's rank is the output mode's


@pytest.mark.parametrize("spec, message", [
    ("lower-conv-tucker{rank=vbmf,ratio=2}", "give only one of"),
    ("lower-conv-tucker{rank=bayes}", "rank must be one of vbmf"),
    ("lower-conv-tucker{weaken=0.5}", "goes with rank=vbmf"),
    ("lower-conv-tucker{rank=vbmf,weaken=2}", "weaken must be in [0, 1]"),
])
def test_bad_vbmf_options(spec, message):
    with pytest.raises(TwistcError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Pipeline.parse(spec)
