"""The uniform presets compress what modern networks have: 1x1 convs and Linear layers as SVD pairs,
kxk convs as Tucker chains, and leave depthwise convs, heads and what cannot shrink dense with reasons."""
import json

import pytest

from twistc.cli import main

MOBILENET_LIKE = '''
import torch
from torch import nn

class Block(nn.Module):
    """An inverted residual with squeeze-and-excitation: 1x1 expand, 3x3 depthwise, SE, 1x1 project."""

    def __init__(self, c, e):
        super().__init__()
        self.expand = nn.Conv2d(c, e, 1)
        self.depthwise = nn.Conv2d(e, e, 3, padding=1, groups=e)
        self.squeeze, self.excite = nn.Conv2d(e, e // 4, 1), nn.Conv2d(e // 4, e, 1)
        self.project = nn.Conv2d(e, c, 1)

    def forward(self, x):
        h = torch.relu(self.depthwise(torch.relu(self.expand(x))))
        h = h * torch.sigmoid(self.excite(torch.relu(self.squeeze(h.mean((2, 3), keepdim=True)))))
        return x + self.project(h)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, stride=2)
        self.blocks = nn.Sequential(Block(32, 128), Block(32, 128))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))

def model():
    torch.manual_seed(0)
    return Net().eval()

def example_inputs():
    return (torch.randn(1, 3, 16, 16),)
'''

VIT_LIKE = '''
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(attention @ v)
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 64, 4, stride=4)
        self.blocks = nn.Sequential(Block(64), Block(64))
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(1))

def model():
    torch.manual_seed(0)
    return Net().eval()

def example_inputs():
    return (torch.randn(1, 3, 16, 16),)
'''


@pytest.mark.parametrize("body, pointwise", [(MOBILENET_LIKE, ("expand", "squeeze", "excite", "project")),
                                             (VIT_LIKE, ("qkv", "proj", "fc1", "fc2"))])
def test_ratio_2_halves_the_1x1_convs_and_linear_layers(tmp_path, body, pointwise):
    path = tmp_path / "model.py"
    path.write_text(body)
    out = tmp_path / "out"
    assert main(["compile", str(path), "--pass", "tucker", "--ratio", "2", "--epochs", "0", "--no-timing",
                 "-o", str(out), "--quiet"]) == 0
    layers = {layer["name"]: layer for layer in json.loads((out / "report.json").read_text())["layers"]}
    inner = [layer for name, layer in layers.items() if name.split(".")[-1] in pointwise]
    assert len(inner) == 8 and all(layer["lowering"] in ("svd-conv", "svd-linear") for layer in inner), \
        {layer["name"]: layer["skip_reason"] for layer in inner if not layer["lowering"]}
    before, after = sum(layer["params_before"] for layer in inner), sum(layer["params_after"] for layer in inner)
    assert 1.9 <= before / after <= 2.6  # the weights of the compressible layers halve (ranks round down)
    head = layers["head"]["skip_reason"]  # dense: a head, and (on the MobileNet-like net) too small to matter
    assert layers["head"]["lowering"] is None and ("head" in head or "save too little" in head), head
    for name, layer in layers.items():
        if name.endswith("depthwise"):
            assert layer["lowering"] is None and "grouped conv" in layer["skip_reason"]
