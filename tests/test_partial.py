"""Partial evaluation reruns only what depends on one weight, and gives the whole model's output."""
import pytest
import torch
from torch import nn

from twistc import trace
from twistc.convs import conv_sites
from twistc.models.resnet_cifar import resnet_cifar
from twistc.partial import Suffix, readers
from twistc.evaluation import in_mode

from tests.passes.test_shared_weights import Tied, Twice


class LinearByHand(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        return self.conv(x).mean((2, 3)) @ self.w.T


def _changed_output_matches(gm, x, weight_name):
    """After the weight changes in place, and again, the suffix gives what the whole model gives."""
    suffix = Suffix(gm, weight_name)
    with in_mode(gm, training=False), torch.no_grad():
        inputs = suffix.inputs(x)
        weight = gm.get_parameter(weight_name)
        for _ in range(2):  # the second rerun reads the same inputs
            weight.add_(0.1 * torch.randn_like(weight))
            torch.testing.assert_close(suffix(x, inputs), gm(x), atol=0, rtol=0)
    return suffix


def test_every_resnet32_conv_suffix_equals_the_whole_model():
    torch.manual_seed(0)
    model = resnet_cifar(32).eval()
    x = torch.randn(4, 3, 32, 32)
    gm = trace(model, (x[:1],))
    rerun = [len(_changed_output_matches(gm, x, site.weight_name).rerun) for site in conv_sites(gm)]
    # the later the layer, the less of the model reruns: from all but the input to a tenth of it
    nodes = len(gm.graph.nodes)
    assert rerun == sorted(rerun, reverse=True) and rerun[0] >= nodes - 2 and rerun[-1] < 0.1 * nodes


@pytest.mark.parametrize("make, weight_name, count", [(Twice, "conv.weight", 2), (lambda: Tied(False), "a.weight", 2),
                                                      (lambda: Tied(False), "b.weight", 2),
                                                      (LinearByHand, "w", 1)])
def test_a_weight_read_in_several_places_or_by_get_attr_reruns_every_reader(make, weight_name, count):
    model = make().eval()
    x = torch.randn(3, 3 if make in (Twice, LinearByHand) else 8, 6, 6)
    gm = trace(model, (x[:1],))
    assert len(readers(gm, weight_name)) == count
    _changed_output_matches(gm, x, weight_name)


class InPlace(nn.Module):
    """In-place ops. "aliased": x.add_(y) on a value another node reads, right only through aliasing;
    "frontier": t.add_(y) on a value computed before the rerun; "kept": in-place ReLUs on values nothing
    else reads, which partial evaluation can keep."""

    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn, self.relu = nn.BatchNorm2d(4), nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn(self.a(x)))
        if self.mode == "aliased":
            x.add_(self.b(x))
            return x.mean((2, 3))
        if self.mode == "frontier":
            return (2 * x).add_(self.b(x)).mean((2, 3))
        return torch.relu_(self.b(x) + x).mean((2, 3))


@pytest.mark.parametrize("mode", ["aliased", "frontier", "kept"])
def test_in_place_ops_are_rerun_only_where_that_is_exact(mode):
    x = torch.randn(2, 4, 6, 6)
    gm = trace(InPlace(mode).eval(), (x[:1],))
    suffix = _changed_output_matches(gm, x, "b.weight")
    assert (len(suffix.rerun) == len(gm.graph.nodes)) == (mode != "kept")  # else the whole model reruns
