import torch
from torch import nn

import twistc
from twistc.passes.cleanup import Cleanup
from twistc.pipeline import Pipeline
from models_for_tests import FunctionalConv, Net

X = torch.randn(2, 3, 12, 12)


class WithDeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Conv2d(3, 4, 3)
        self.unused = nn.Conv2d(3, 4, 3)
        self.spare = nn.Parameter(torch.ones(3))

    def forward(self, x):
        self.unused(x) * 2  # computed, never returned
        return self.used(x)


def test_removes_dead_nodes_and_unused_modules_without_changing_outputs():
    model = WithDeadBranch().eval()
    gm = twistc.trace(model, (X,))
    expected = gm(X)
    result = Cleanup()(gm)
    gm.recompile()
    assert result.modified and result.rewrites >= 3
    assert not hasattr(gm, "unused") and not hasattr(gm, "spare")
    assert all(n.target != "unused" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(X), expected, atol=0, rtol=0)
    assert Cleanup()(gm).modified is False


def test_drops_finished_projections_and_lowered_functional_parameters():
    x = torch.randn(2, 5, 12, 12)  # more channels than a stem's: the conv is projected
    gm = twistc.trace(nn.Sequential(FunctionalConv(nn.Conv2d(5, 8, 3, padding=1))).eval(), (x,))
    gm = Pipeline.parse("deeptwist{ratio=2,period=5}").run(gm)
    twistc.final_projection(gm)
    expected = gm(x)
    gm = Pipeline.parse("cleanup").run(gm)
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]  # projection gone, conv stays dense
    torch.testing.assert_close(gm(x), expected, atol=0, rtol=0)
    gm = Pipeline.parse("lower-conv-tucker{ratio=2},cleanup").run(gm)
    names = dict(gm.named_parameters())
    assert "0.w" not in names and "0.w_tucker.core.weight" in names


def test_unfinished_projections_stay():
    gm = twistc.trace(Net().eval(), (X,))
    gm = Pipeline.parse("deeptwist{ratio=2},cleanup").run(gm)
    assert any(n.target.endswith("weight_projection") for n in gm.graph.nodes if n.op == "call_module")
