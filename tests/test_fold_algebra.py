"""The fold algebra (twistc/fold.py): each fold is exact."""
import pytest
import torch
from torch import nn

from twistc.fold import fold_batchnorm, merge_convs, mergeable

X = torch.randn(2, 6, 11, 13, dtype=torch.float64)


def _bn(channels: int, affine: bool = True) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, affine=affine).double().eval()
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
