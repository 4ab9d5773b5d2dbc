import pytest
import torch
from torch import nn

import twistc
from twistc.errors import TraceError
from twistc.decomp.tucker import TuckerConv
from twistc.pipeline import Pipeline
from models_for_tests import Net, UntraceableTop, WithUntraceableChild

X = torch.randn(2, 3, 10, 10)


def test_shapes_are_attached_and_layers_named_by_parameter():
    gm = twistc.trace(Net().eval(), (X,))
    conv2 = next(n for n in gm.graph.nodes if n.target == "conv2")
    assert tuple(conv2.meta["tensor_meta"].shape) == (2, 16, 5, 5)
    state = twistc.state_of(gm)
    assert list(state.layers) == ["conv1", "conv2", "point", "grouped"]
    assert state.layers["conv2"].geometry.in_hw == (10, 10) and state.layers["conv2"].geometry.out_hw == (5, 5)
    assert state.output_shapes == [(2, 16, 5, 5)]


def test_trace_restores_training_mode():
    model = Net().train()
    gm = twistc.trace(model, (X,))
    assert gm.conv1.training


def test_untraceable_child_becomes_leaf_and_other_convs_are_lowered():
    model = WithUntraceableChild().eval()
    expected = model(X)
    gm = twistc.trace(model, (X,))
    state = twistc.state_of(gm)
    assert list(state.leaves) == ["odd"]
    assert "control flow" in state.leaves["odd"] and "models_for_tests.py" in state.leaves["odd"]
    assert "inside untraceable module odd" in state.layers["odd.inner"].skip_reason
    gm = Pipeline.parse("lower-conv-tucker{ranks=8x3},cleanup").run(gm)
    assert isinstance(gm.stem, TuckerConv) and isinstance(gm.head, TuckerConv)
    assert type(gm.odd.inner) is torch.nn.Conv2d
    assert state.layers["odd.inner"].lowering is None
    assert gm(X).shape == expected.shape


def test_untraceable_top_level_names_module_and_line():
    with pytest.raises(TraceError, match=r"UntraceableTop\.forward.*models_for_tests\.py:\d+: if x\.mean\(\) > 0"):
        twistc.trace(UntraceableTop(), (X,))


def test_bad_example_inputs_are_a_clear_error():
    with pytest.raises(TraceError, match="example_inputs"):
        twistc.trace(Net(), (torch.randn(1, 5, 8, 8),))


def test_conv_kinds_without_a_decomposition_are_recorded_with_a_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(5, 6, 3)
            self.c3 = nn.Conv3d(1, 2, (3, 3, 3))
            self.up = nn.ConvTranspose2d(2, 3, 2, stride=2)
            self.c2 = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, seq, vol):
            img = self.c3(vol).mean(2)
            return self.c2(self.up(img)).mean() + self.c1(seq).mean()

    gm = twistc.trace(Mixed(), (torch.randn(1, 5, 10), torch.randn(1, 1, 5, 6, 6)))
    gm = Pipeline.parse("lower-conv-tucker{ratio=1.5},cleanup").run(gm)
    layers = twistc.state_of(gm).layers
    assert layers["c2"].lowering == layers["c1"].lowering == "tucker-chain"
    for name, kind in (("c3", "Conv3d"), ("up", "ConvTranspose2d")):
        assert layers[name].lowering is None and layers[name].skip_reason.startswith(f"{kind}: no decomposition")
    assert layers["c1"].before.params == 6 * 5 * 3 and layers["c3"].before.params == 2 * 1 * 27
    assert layers["c1"].geometry.kind == "Conv1d" and layers["c1"].geometry.out_hw == (8, 1)
