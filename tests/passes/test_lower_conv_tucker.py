import pytest
import torch
from torch import nn

import twistc
from twistc.decomp.tucker import tucker2
from twistc.decomp.tucker import TuckerConv
from twistc.passes.lower_aliases import LowerConvTucker
from twistc.pipeline import Pipeline
from models_for_tests import CONV_CASES, FunctionalConv, Net

CASES = CONV_CASES
T, S = 8, 6
X = torch.randn(2, S, 11, 10)


def _conv(case, functional):
    conv = nn.Conv2d(S, T, **CASES[case]).eval()
    if functional:
        if conv.padding_mode != "zeros":
            pytest.skip("F.conv2d has no padding modes")
        return FunctionalConv(conv).eval()
    return nn.Sequential(conv).eval()


def _lower(model, spec):
    gm = twistc.trace(model, (X,))
    return Pipeline.parse(spec).run(gm)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("case", CASES)
def test_full_rank_equals_original(case, functional):
    model = _conv(case, functional)
    expected = model(X)
    gm = _lower(model, f"lower-conv-tucker{{ranks={T}x{S}}}")
    assert [n.target.rpartition(".")[2] for n in gm.graph.nodes if n.op == "call_module"] == \
        ["reduce", "core", "expand"]
    torch.testing.assert_close(gm(X), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("case", CASES)
def test_truncated_equals_reconstruction(case, functional):
    conv = nn.Conv2d(S, T, **CASES[case]).eval()
    model = FunctionalConv(conv) if functional and conv.padding_mode == "zeros" else nn.Sequential(conv)
    if functional and conv.padding_mode != "zeros":
        pytest.skip("F.conv2d has no padding modes")
    w = conv.weight.detach().clone()
    with torch.no_grad():
        reference = nn.Conv2d(S, T, **CASES[case]).eval()
        reference.weight.copy_(tucker2(w, (3, 2)).reconstruct())
        if conv.bias is not None:
            reference.bias.copy_(conv.bias)
        expected = reference(X)
    gm = _lower(model, "lower-conv-tucker{ranks=3x2}")
    torch.testing.assert_close(gm(X), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, conv(X), atol=1e-3)  # the truncation really changed the conv


def test_structure_count_and_skip_reasons():
    model = Net().eval()
    gm = twistc.trace(model, (torch.randn(1, 3, 16, 16),))
    result = LowerConvTucker.from_options({"ratio": "2"})(gm)
    assert result.modified and result.rewrites == 1
    assert isinstance(gm.conv2, TuckerConv)
    assert type(gm.conv1) is type(gm.point) is type(gm.grouped) is nn.Conv2d
    layers = twistc.state_of(gm).layers
    assert layers["conv1"].skip_reason.startswith("the model's stem")
    assert "1x1" in layers["point"].skip_reason
    assert "groups=2" in layers["grouped"].skip_reason
    assert layers["conv2"].to_json(twistc.state_of(gm).plan.get("conv2"))["ranks"] == list(twistc.state_of(gm).plan.get("conv2").ranks)
    reduce, core, expand = gm.conv2.reduce, gm.conv2.core, gm.conv2.expand
    assert reduce.kernel_size == (1, 1) and reduce.stride == (1, 1) and reduce.bias is None
    assert core.stride == (2, 2) and core.padding == (1, 1) and core.bias is None
    assert expand.kernel_size == (1, 1) and expand.bias is None  # conv2 had no bias


def test_second_run_and_non_matching_graph_change_nothing():
    gm = twistc.trace(Net().eval(), (torch.randn(1, 3, 16, 16),))
    assert LowerConvTucker.from_options({"ratio": "2"})(gm).rewrites == 1
    code = gm.code
    again = LowerConvTucker()(gm)
    assert again.modified is False and again.rewrites == 0 and gm.code == code
    plain = twistc.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    assert LowerConvTucker(ratio=2.0)(plain).modified is False


def test_without_ranks_only_planned_layers_are_lowered():
    gm = twistc.trace(Net().eval(), (torch.randn(1, 3, 16, 16),))
    twistc.state_of(gm).plan.set("conv2", twistc.LayerPlan("tucker", (4, 2), "tucker-chain"))
    result = LowerConvTucker()(gm)
    assert result.rewrites == 1 and gm.conv2.core.weight.shape == (4, 2, 3, 3)
    assert "no ranks" in twistc.state_of(gm).layers["conv1"].skip_reason


def test_layers_option_selects_by_pattern():
    gm = twistc.trace(Net().eval(), (torch.randn(1, 3, 16, 16),))
    result = LowerConvTucker.from_options({"layers": "conv2|nothing*", "ratio": "2"})(gm)
    assert result.rewrites == 1 and isinstance(gm.conv2, TuckerConv) and type(gm.conv1) is nn.Conv2d
    assert "not selected" in twistc.state_of(gm).layers["conv1"].skip_reason


@pytest.mark.parametrize("case", ["same-dilated", "reflect", "nonsquare"])
def test_onnx_of_lowering_matches_pytorch(case, tmp_path):
    model = _conv(case, functional=False)
    gm = _lower(model, "lower-conv-tucker{ranks=4x3},cleanup")
    check = twistc.export_onnx(gm, (X,), tmp_path / "m.onnx")
    assert check.max_abs_diff < 1e-4 and check.batch_sizes == (2, 3)
