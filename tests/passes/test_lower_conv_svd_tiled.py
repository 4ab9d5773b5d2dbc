import copy

import pytest
import torch
from torch import nn

import twistc
from twistc.decomp.svd import lowered, unlowered
from twistc.decomp.tiling import TileGrid, tiled_svd
from twistc.decomp.im2col import ChannelBlockConv, LowRankGemm, TapBlockGemm
from twistc.decomp.tiled_svd import SvdConv
from twistc.pipeline import Pipeline
from twistc.report import layer_rows
from models_for_tests import CONV_CASES, FunctionalConv, Net

CASES = {**CONV_CASES, "1x1": dict(kernel_size=1)}
T, S = 8, 6
X = torch.randn(2, S, 11, 10)
SPECS = {
    "svd-conv": "lower-conv-svd{{ranks={r},order={o}}}",
    "svd-im2col-unfold": "lower-conv-svd{{form=im2col,im2col=unfold,ranks={r},order={o}}}",
    "svd-im2col-onehot": "lower-conv-svd{{form=im2col,im2col=onehot,ranks={r},order={o}}}",
    "svd-im2col-slices": "lower-conv-svd{{form=im2col,im2col=slices,ranks={r},order={o}}}",
    "tiled": "lower-conv-tiled-lowrank{{tile=3x5,im2col=unfold,ranks={r},order={o}}}",  # ragged tiles
    "tiled-grid-onehot": "lower-conv-tiled-lowrank{{grid=2x3,im2col=onehot,ranks={r},order={o}}}",
    "tiled-slices": "lower-conv-tiled-lowrank{{tile=3x5,im2col=slices,ranks={r},order={o}}}",
}


GRIDS = {"tiled": lambda shape: TileGrid.from_tile(shape, (3, 5)),
         "tiled-slices": lambda shape: TileGrid.from_tile(shape, (3, 5)),
         "tiled-grid-onehot": lambda shape: TileGrid.from_grid(shape, (2, 3))}


def _grid(spec_name, shape):
    return GRIDS.get(spec_name, lambda shape: TileGrid.from_grid(shape, (1, 1)))(shape)


def _reference(conv, grid: TileGrid, rank, order):
    """A copy of the conv whose kernel is the math's low-rank reconstruction."""
    k = lowered(conv.weight.detach(), order)
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.copy_(unlowered(tiled_svd(k, grid, rank).reconstruct(), tuple(conv.weight.shape), order))
    return ref


@pytest.mark.parametrize("order", ["channel-major", "tap-major"])
@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("case", CASES)
def test_full_and_truncated_rank(case, spec_name, order):
    conv = nn.Conv2d(S, T, **CASES[case]).eval()
    expected = conv(X)
    full = min(_grid(spec_name, (T, S * conv.kernel_size[0] * conv.kernel_size[1])).tile)
    gm = Pipeline.parse(SPECS[spec_name].format(r=full, o=order)).run(twistc.trace(nn.Sequential(conv), (X,)))
    torch.testing.assert_close(gm(X), expected, atol=1e-5, rtol=0)

    ref = _reference(conv, _grid(spec_name, (T, S * conv.kernel_size[0] * conv.kernel_size[1])), 1, order)
    gm = Pipeline.parse(SPECS[spec_name].format(r=1, o=order)).run(twistc.trace(nn.Sequential(conv), (X,)))
    lowered_module = gm.get_submodule("0")
    assert isinstance(lowered_module, SvdConv if spec_name == "svd-conv" else LowRankGemm)
    torch.testing.assert_close(gm(X), ref(X), atol=1e-5, rtol=0)


# (form, order, module, rows, channels): column tiles are `channels` input channels of one tap
# (tap-blocks) or `channels` whole input channels with all their taps (channel-blocks)
BLOCK_TILES = [("tap-blocks", "tap-major", TapBlockGemm, r, c) for r, c in [(3, 3), (8, 2), (5, 6)]] + [
    ("channel-blocks", "channel-major", ChannelBlockConv, r, c) for r, c in [(3, 1), (8, 2), (5, 3), (4, 6)]]


@pytest.mark.parametrize("form,order,module,rows,channels", BLOCK_TILES)
@pytest.mark.parametrize("case", CASES)
def test_block_forms_equal_the_conv_and_the_math(case, form, order, module, rows, channels):
    conv = nn.Conv2d(S, T, **CASES[case]).eval()
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    width = channels * taps if form == "channel-blocks" else channels
    grid = TileGrid.from_tile((T, S * taps), (rows, width))
    spec = f"lower-conv-tiled-lowrank{{{{tile={rows}x{width},order={order},im2col={form},ranks={{}}}}}}"
    gm = Pipeline.parse(spec.format(min(grid.tile))).run(twistc.trace(nn.Sequential(conv), (X,)))
    assert type(gm.get_submodule("0")) is module
    torch.testing.assert_close(gm(X), conv(X), atol=1e-5, rtol=0)
    gm = Pipeline.parse(spec.format(1)).run(twistc.trace(nn.Sequential(conv), (X,)))
    torch.testing.assert_close(gm(X), _reference(conv, grid, 1, order)(X), atol=1e-5, rtol=0)


@pytest.mark.parametrize("form,options", [
    ("tap-blocks", "tile=4x4,order=tap-major"), ("tap-blocks", "tile=3x3"), ("tap-blocks", "grid=2x3,order=tap-major"),
    ("channel-blocks", "tile=4x4"), ("channel-blocks", "tile=4x9,order=tap-major"), ("channel-blocks", "tile=4x36"),
])
def test_block_forms_refuse_tiles_that_do_not_line_up_with_channels(form, options):
    gm = twistc.trace(nn.Sequential(nn.Conv2d(S, T, 3)), (X,))
    with pytest.raises(twistc.TwistcError, match=f"layer 0: {form} needs order="):
        Pipeline.parse(f"lower-conv-tiled-lowrank{{{options},im2col={form},ranks=1}}").run(gm)


@pytest.mark.parametrize("options,form,module", [
    ("tile=4x18", "channel-blocks", ChannelBlockConv), ("grid=2x3", "channel-blocks", ChannelBlockConv),
    ("tile=4x8", "onehot", LowRankGemm), ("tile=4x18,order=tap-major", "onehot", LowRankGemm),
])
def test_auto_form_uses_channel_blocks_where_the_tiles_fit_and_reports_it(options, form, module):
    conv = nn.Conv2d(S, T, 3, padding=1).eval()
    gm = Pipeline.parse(f"lower-conv-tiled-lowrank{{{options},ranks=2}}").run(twistc.trace(nn.Sequential(conv), (X,)))
    assert type(gm.get_submodule("0")) is module
    layer = twistc.state_of(gm).layers["0"].to_json()
    assert layer["form"] == form
    report = {"layers": [layer], "totals": {"params_before": 1, "params_after": 1, "macs_before": 1, "macs_after": 1,
                                            "ratio": 1.0}}
    assert layer_rows(report)[0][2] == f"tiled-lowrank ({form})"


def test_functional_conv_and_report_costs():
    conv = nn.Conv2d(S, T, 3, padding=1).eval()
    model = nn.Sequential(FunctionalConv(conv)).eval()
    gm = Pipeline.parse("lower-conv-tiled-lowrank{grid=2x2,ranks=2},cleanup").run(twistc.trace(model, (X,)))
    torch.testing.assert_close(gm(X), _reference(conv, TileGrid.from_grid((T, S * 9), (2, 2)), 2, "channel-major")(X), atol=1e-5, rtol=0)
    record = twistc.state_of(gm).layers["0.w"]
    assert record.lowering == "tiled-lowrank" and twistc.state_of(gm).plan.get("0.w").ranks == (2,)
    assert record.after.params == 2 * (2 * T + 2 * S * 9)  # r * (gc*T + gr*N)
    assert record.after.macs == record.after.params * 11 * 10
    assert "0.w" not in dict(gm.named_parameters())


def test_report_says_how_ragged_tiles_are_handled():
    gm = Pipeline.parse("lower-conv-tiled-lowrank{tile=3x5,ranks=2}").run(twistc.trace(nn.Sequential(nn.Conv2d(S, T, 3)), (X,)))
    layer = twistc.state_of(gm).layers["0"].to_json()
    assert layer["tiles"] == {"grid": [3, 11], "tile": [3, 5], "ragged_edges": "zero-padded to the common tile shape"}
    report = {"layers": [layer], "totals": {"params_before": 1, "params_after": 1, "macs_before": 1, "macs_after": 1,
                                            "ratio": 1.0}}
    assert layer_rows(report)[0][-1] == "3x11 tiles of 3x5, ragged edges zero-padded to the common tile shape"
    even = Pipeline.parse("lower-conv-tiled-lowrank{grid=2x2,ranks=2}").run(twistc.trace(nn.Sequential(nn.Conv2d(S, T, 3)), (X,)))
    assert twistc.state_of(even).layers["0"].to_json()["tiles"]["ragged_edges"] is None


def test_ratio_chooses_rank_and_skips_grouped():
    gm = twistc.trace(Net().eval(), (torch.randn(1, 3, 12, 12),))
    Pipeline.parse("lower-conv-svd{ratio=2}").run(gm)
    state = twistc.state_of(gm)
    assert {n for n, r in state.layers.items() if r.lowering} == {"conv2", "point"}
    assert "groups=2" in state.layers["grouped"].skip_reason
    assert state.layers["conv1"].skip_reason.startswith("the model's stem: it keeps its 3 input channels and every value it reads (27 with")
    for name in ("conv2", "point"):
        assert state.layers[name].to_json()["ratio_achieved"] >= 2


@pytest.mark.parametrize("spec", [
    "lower-conv-svd{form=im2col,ratio=2,order=tap-major},cleanup",
    "lower-conv-tiled-lowrank{tile=8x8,ratio=2},cleanup",
    "lower-conv-tiled-lowrank{tile=4x8,ranks=2,im2col=onehot},cleanup",
    "lower-conv-tiled-lowrank{tile=3x8,ranks=2,im2col=slices,order=tap-major},cleanup",
    "lower-conv-tiled-lowrank{tile=3x2,ranks=2,im2col=tap-blocks,order=tap-major},cleanup",
    "lower-conv-tiled-lowrank{tile=3x18,ranks=2,im2col=channel-blocks},cleanup",
])
def test_onnx_matches_pytorch(spec, tmp_path):
    model = nn.Sequential(nn.Conv2d(S, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1,
                                                                                  padding_mode="reflect")).eval()
    gm = Pipeline.parse(spec).run(twistc.trace(model, (X,)))
    check = twistc.export_onnx(gm, (X,), tmp_path / "m.onnx")
    assert check.max_abs_diff < 1e-4


@pytest.mark.parametrize("decomp,lower,extra,conv2_form", [
    ("svd", "lower-conv-svd", "", None), ("svd", "lower-conv-svd{form=im2col}", ",order=tap-major", "onehot"),
    ("tiled-svd", "lower-conv-tiled-lowrank", ",tile=4x8", "onehot"),
    ("tiled-svd", "lower-conv-tiled-lowrank", ",grid=2x3", "onehot"),
    ("tiled-svd", "lower-conv-tiled-lowrank", ",tile=4x18", "channel-blocks"),
])
def test_deeptwist_2d_projection_makes_every_tile_low_rank_and_lowering_exact(decomp, lower, extra, conv2_form):
    model = Net().eval()
    x = torch.randn(4, 3, 12, 12)
    gm = Pipeline.parse(f"deeptwist{{decomp={decomp},ranks=2,period=3,layers=conv*{extra}}}").run(
        twistc.trace(model, (x,)))
    twistc.train(gm, lambda: [(x, torch.zeros(4, dtype=torch.long))] * 4, epochs=1, lr=0.05,
                 loss_fn=lambda out, y: out.square().mean(), progress=False)
    for name in ("conv1", "conv2"):
        projection = gm.get_submodule(f"{name}.weight_projection")
        k = lowered(gm.get_parameter(f"{name}.weight").detach(), projection.plan.order)
        grid = projection.plan.tile_grid(tuple(k.shape))
        assert all(torch.linalg.matrix_rank(k[rs, cs].double(), rtol=1e-6) <= 2 for _, _, rs, cs in grid.tiles())
        assert int(projection.distortions) == 1 and projection.finalized
    gm.eval()
    projected = gm(x)
    gm = Pipeline.parse(f"{lower},cleanup").run(gm)
    torch.testing.assert_close(gm(x), projected, atol=1e-5, rtol=1e-5)
    assert twistc.state_of(gm).layers["conv2"].lowering in ("svd-conv", "svd-im2col", "tiled-lowrank")
    assert twistc.state_of(gm).layers["conv2"].form == conv2_form


def test_tiled_options_are_validated():
    for bad in ("deeptwist{decomp=tiled-svd}", "deeptwist{decomp=svd,tile=8x8}",
                "lower-conv-tiled-lowrank{tile=8x8,grid=2x2}", "lower-conv-svd{form=gemm}",
                "lower-conv-svd{order=row-major}", "deeptwist{decomp=tiled-svd,grid=2x2,energy=0.9}"):
        with pytest.raises(twistc.TwistcError):
            gm = twistc.trace(Net().eval(), (torch.randn(1, 3, 8, 8),))
            Pipeline.parse(bad).run(gm)
