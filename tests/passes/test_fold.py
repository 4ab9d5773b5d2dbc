import torch
from torch import nn

import twistc
from twistc.passes.fold import Fold
from twistc.pipeline import Pipeline
from twistc.state import state_of

X = torch.randn(2, 3, 16, 16)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.shared = nn.Conv2d(16, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn1(self.conv(x))
        return self.bn2(self.shared(y)) + self.shared(x)  # `shared` is called twice: its BN stays


def _trained_stats(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16) * 2 + 1)
    return model.eval()


def test_fold_is_exact_and_keeps_what_cannot_fold():
    torch.manual_seed(0)
    model = _trained_stats(Block())
    gm = twistc.trace(model, (X,))
    gm = Pipeline.parse("lower-conv-tucker{ranks=16x3,layers=stem|conv}").run(gm)
    expected = gm(X)
    gm = Pipeline.parse("fold,cleanup").run(gm)
    torch.testing.assert_close(gm(X), expected, atol=1e-5, rtol=1e-5)
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds.count("BatchNorm2d") == 1  # bn2: after a conv that is also called elsewhere
    # ranks 16x3: on the stem both ranks equal its channels (3 in, 16 out), so the chain is one conv
    # again; on `conv` the expanding 1x1 is a change of basis the core absorbs, the reducing one stays
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert [c for c in calls if c.startswith(("stem.", "conv."))] == ["stem.expand", "conv.reduce", "conv.expand"]
    layers = state_of(gm).layers
    assert layers["stem"].after.params == 3 * 16 * 9 and layers["conv"].after.params == 16 * 3 + 3 * 16 * 9
    assert Fold()(gm).modified is False


def test_merges_only_where_cheaper():
    torch.manual_seed(0)
    gm = twistc.trace(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)).eval(), (torch.randn(1, 16, 8, 8),))
    gm = Pipeline.parse("lower-conv-tucker{ranks=4x4},fold").run(gm)
    # ranks 4x4 of 32x16: 16*4 + 4*4*9 + 4*32 MACs per pixel, merged 16*32*9 - the chain stays
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0.reduce", "0.core", "0.expand"]


def test_full_rank_tucker_collapses_to_one_conv():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 8, 8)
    gm = twistc.trace(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1)).eval(), (x,))
    expected = gm(x)
    gm = Pipeline.parse("lower-conv-tucker{ranks=8x8},fold,cleanup").run(gm)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0.expand"]
    torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=1e-5)
    assert state_of(gm).layers["0"].after.params == 8 * 8 * 9


class _Head(nn.Module):
    """A Conv1d and a Linear layer, each followed by BatchNorm1d, and a Linear over tokens whose
    BatchNorm1d normalises the token axis (not its features), which cannot fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm1d(8)
        self.tokens = nn.Linear(8, 8)
        self.bn1 = nn.BatchNorm1d(6)
        self.fc = nn.Linear(48, 10)
        self.bn2 = nn.BatchNorm1d(10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv(x))).transpose(1, 2)  # (batch, 6 tokens, 8)
        return self.bn2(self.fc(self.bn1(self.tokens(x)).flatten(1)))


def test_batchnorm1d_folds_into_conv1d_and_linear_layers_svd_lowered_or_not():
    torch.manual_seed(0)
    model = _Head().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 4, 6) * 2 + 1)
    x = torch.randn(3, 4, 6)
    gm = twistc.trace(model.eval(), (x,))
    gm = Pipeline.parse("lower-linear-svd{ranks=5,layers=fc}").run(gm)
    expected = gm(x)
    gm = Pipeline.parse("fold,cleanup").run(gm)
    torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=1e-5)
    left = [n.target for n in gm.graph.nodes if n.op == "call_module" and "bn" in n.target]
    assert left == ["bn1"]
