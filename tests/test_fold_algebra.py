"""The fold algebra (twistc/fold.py): each fold is exact."""
import pytest
import torch
from torch import nn

from twistc.fold import fold_batchnorm, foldable_batchnorm, merge_convs, mergeable

X = torch.randn(2, 6, 11, 13, dtype=torch.float64)


def _bn(channels: int, affine: bool = True, kind=nn.BatchNorm2d) -> nn.BatchNorm2d:
    bn = kind(channels, affine=affine).double().eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    if affine:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -1, 1)
    return bn


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("sampling", [{}, {"stride": 2, "padding": 1}, {"padding": "same", "dilation": 2},
                                      {"padding": 1, "padding_mode": "reflect"}, {"groups": 2, "padding": 1}])
def test_batchnorm_folds_exactly(bias, affine, sampling):
    conv = nn.Conv2d(6, 8, 3, bias=bias, **sampling).double()
    bn = _bn(8, affine)
    folded = fold_batchnorm(conv, bn)
    assert folded.bias is not None and folded.groups == conv.groups
    torch.testing.assert_close(folded(X), bn(conv(X)), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("make, x", [(lambda bias: nn.Conv1d(6, 8, 3, stride=2, padding=1, bias=bias),
                                      torch.randn(2, 6, 17)),
                                     (lambda bias: nn.Linear(6, 8, bias=bias), torch.randn(5, 6))],
                         ids=["conv1d", "linear"])
def test_batchnorm1d_folds_exactly_into_conv1d_and_linear(bias, make, x):
    layer, bn = make(bias).double(), _bn(8, kind=nn.BatchNorm1d)
    assert foldable_batchnorm(layer, bn, x.dim())
    folded = fold_batchnorm(layer, bn)
    torch.testing.assert_close(folded(x.double()), bn(layer(x.double())), atol=1e-12, rtol=1e-12)


def test_batchnorm_that_does_not_match_the_layer_is_not_folded():
    bn1, bn2 = _bn(8, kind=nn.BatchNorm1d), _bn(8)
    assert not foldable_batchnorm(nn.Linear(6, 8), bn1, 3)  # (batch, tokens, 8): BatchNorm1d would see tokens
    assert not foldable_batchnorm(nn.Conv2d(6, 8, 1), bn1, 4) and not foldable_batchnorm(nn.Conv1d(6, 8, 1), bn2, 3)
    training = nn.BatchNorm1d(8, track_running_stats=False)
    assert not foldable_batchnorm(nn.Linear(6, 8), training, 2)


PAIRS = {
    "1x1 then 3x3 strided": (nn.Conv2d(6, 4, 1, bias=False), nn.Conv2d(4, 5, 3, stride=2, padding=1)),
    "1x1 with bias then unpadded 3x3": (nn.Conv2d(6, 4, 1), nn.Conv2d(4, 5, 3, dilation=2)),
    "3x3 then 1x1 with biases": (nn.Conv2d(6, 4, 3, padding="same"), nn.Conv2d(4, 5, 1)),
    "3x3 no bias then 1x1": (nn.Conv2d(6, 4, (3, 2), stride=(2, 1), bias=False), nn.Conv2d(4, 5, 1, bias=False)),
    "1x1 then 1x1": (nn.Conv2d(6, 4, 1), nn.Conv2d(4, 5, 1)),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_convs_merge_exactly(name):
    first, second = (c.double() for c in PAIRS[name])
    assert mergeable(first, second)
    merged = merge_convs(first, second)
    assert (merged.in_channels, merged.out_channels) == (6, 5)
    torch.testing.assert_close(merged(X), second(first(X)), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("first, second, why", [
    (nn.Conv2d(6, 4, 1), nn.Conv2d(4, 5, 3, padding=1), "padding cannot see the first conv's bias"),
    (nn.Conv2d(6, 4, 3), nn.Conv2d(4, 5, 3), "neither conv is a plain 1x1"),
    (nn.Conv2d(6, 4, 1, stride=2), nn.Conv2d(4, 5, 3), "a strided 1x1 drops pixels"),
    (nn.Conv2d(6, 4, 3, groups=2), nn.Conv2d(4, 5, 1), "grouped"),
    (nn.Conv2d(6, 4, 1, bias=False), nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"), "reflect padding"),
])
def test_pairs_that_are_not_one_conv_are_left(first, second, why):
    assert not mergeable(first, second), why
