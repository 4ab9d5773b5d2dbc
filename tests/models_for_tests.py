"""Small models and conv configurations shared by the tests."""
import torch
import torch.nn.functional as F
from torch import nn

from twistc import Pipeline, trace

# A MODEL.py for CLI tests: a small CNN on 3x8x8 inputs, 4 classes (tests add train_data() and eval_data())
TINY_MODEL_PY = '''
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

def example_inputs():
    return (torch.randn(1, 3, 8, 8),)
'''


def tiny_deeptwist_cnn():
    """TINY_MODEL_PY's CNN (no BatchNorm) under deeptwist{ratio=2,period=2}, traced on 3x8x8 inputs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return Pipeline.parse("deeptwist{ratio=2,period=2}").run(trace(net, (torch.randn(1, 3, 8, 8),)))


# nn.Conv2d keyword arguments covering bias, stride, padding ('same' too), padding modes, dilation, kernel shapes
CONV_CASES = {
    "bias": dict(kernel_size=3, padding=1),
    "stride2-nobias": dict(kernel_size=3, stride=2, padding=1, bias=False),
    "same-dilated": dict(kernel_size=3, padding="same", dilation=2),
    "same-even": dict(kernel_size=(2, 4), padding="same"),
    "nonsquare": dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    "reflect": dict(kernel_size=5, padding=2, padding_mode="reflect", bias=False),
    "circular-stride": dict(kernel_size=3, stride=2, padding=1, padding_mode="circular"),
    "replicate-3x1": dict(kernel_size=(3, 1), padding=1, padding_mode="replicate"),
    "dilated-nopad": dict(kernel_size=3, dilation=(2, 1)),
}


class FunctionalConv(nn.Module):
    """A conv written as F.conv2d on parameters (no nn.Conv2d)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.w = nn.Parameter(conv.weight.detach().clone())
        self.b = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.args = (conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, *self.args)


class Net(nn.Module):
    """conv -> relu -> conv(stride 2) -> relu -> 1x1 conv -> grouped conv."""

    def __init__(self, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.point = nn.Conv2d(2 * width, 2 * width, 1)
        self.grouped = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.grouped(self.point(x))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self, width=8):
        super().__init__()
        self.inner = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return -self.inner(x)


class WithUntraceableChild(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.odd = Untraceable(width)
        self.head = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return self.head(F.relu(self.odd(F.relu(self.stem(x)))))


class UntraceableTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.mean() > 0:
            x = x * 2
        return self.conv(x)


class Classifier(Net):
    """Net with global average pooling: logits over 2 * width classes."""

    def forward(self, x):
        return super().forward(x).mean(dim=(2, 3))
