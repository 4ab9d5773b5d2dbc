import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import twistc
from twistc.errors import ExportCheckError
from twistc.bench import bench
from twistc.latency import Runtime, model_timer
from twistc.pipeline import Pipeline
from twistc.report import build_report
from models_for_tests import Net

X = torch.randn(1, 3, 12, 12)


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    gm = Pipeline.parse("lower-conv-tucker{ratio=2},cleanup").run(twistc.trace(Net().eval(), (X,)))
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return gm, path, twistc.export_onnx(gm, (X,), path)


def test_export_is_self_contained_with_dynamic_batch(lowered, tmp_path):
    gm, path, check = lowered
    assert check.max_abs_diff < 1e-5 and check.batch_sizes == (1, 3)
    moved = tmp_path / "renamed.onnx"
    moved.write_bytes(path.read_bytes())
    path_siblings = [p.name for p in path.parent.iterdir()]
    assert path_siblings == ["model.onnx"]  # no external-data file beside it
    model = onnx.load(str(moved))
    assert not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    session = ort.InferenceSession(str(moved), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 12, 12)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, gm(x).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_mismatch_is_an_error(lowered):
    gm, path, _ = lowered
    other = Net().eval()  # different weights, same shapes
    with pytest.raises(ExportCheckError, match="differs from PyTorch"):
        twistc.export.check_onnx(other, (X,), path)


def test_bench_times_models_side_by_side(lowered, tmp_path):
    gm, path, _ = lowered
    dense = tmp_path / "dense.onnx"
    twistc.export_onnx(Net().eval(), (X,), dense)
    result = bench([str(dense), str(path)], batch=2, threads=1, warmup=2, reps=5)
    assert [m["path"] for m in result["models"]] == [str(dense), str(path)]
    first, second = result["models"]
    assert first["speedup_vs_first"] == 1.0
    assert second["speedup_vs_first"] == pytest.approx(first["median_ms"] / second["median_ms"])  # one statistic
    assert all(m["median_ms"] > 0 and m["p10_ms"] <= m["p90_ms"] for m in result["models"])
    assert result["repetitions"] in (5, 15) and result["provider"] == "cpu" and result["threads"] == 1


class TokensAndScale(torch.nn.Module):
    """Two inputs, one of them integer token ids, as a text model's."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 4)

    def forward(self, tokens, scale):
        return self.proj(self.embed(tokens).mean(1)) * scale


def test_several_inputs_and_integer_inputs_are_timed(tmp_path):
    model, inputs = TokensAndScale().eval(), (torch.randint(0, 50, (1, 7)), torch.ones(1, 1))
    path = tmp_path / "tokens.onnx"
    twistc.export_onnx(model, inputs, path)
    result = bench([str(path)], batch=3, threads=1, warmup=1, reps=3)  # zeros for the token ids
    assert result["models"][0]["median_ms"] > 0
    for runtime in (Runtime("ort", "cpu", 1, 3), Runtime("torch", "cpu", 1, 3)):
        run = model_timer(model, inputs, runtime, path if runtime.runtime == "ort" else None)
        assert run() > 0


LOWERINGS = {
    "tucker-chain": "lower-conv-tucker{ratio=2}",
    "svd-conv": "lower-conv-svd{ratio=2}",
    "svd-onehot": "lower-conv-svd{ratio=2,form=im2col,im2col=onehot}",
    "svd-slices": "lower-conv-svd{ratio=2,form=im2col,im2col=slices}",
    "svd-unfold": "lower-conv-svd{ratio=2,form=im2col,im2col=unfold}",
    "tiled-onehot": "lower-conv-tiled-lowrank{ratio=2,tile=8x9,im2col=onehot}",
    "tiled-channel-blocks": "lower-conv-tiled-lowrank{ratio=2,tile=8x18,im2col=channel-blocks,layers=1|4}",
    "tiled-tap-blocks": "lower-conv-tiled-lowrank{ratio=2,tile=8x8,order=tap-major,im2col=tap-blocks,layers=1|4}",
}


@pytest.mark.parametrize("form", list(LOWERINGS))
def test_reported_numbers_are_what_the_onnx_file_stores(form, tmp_path):
    """params_after counts every stored number, one-hot kernels and tile padding included: after `fold`
    it is the element count of model.onnx's initializers, and each layer's count is its module's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 1), torch.nn.Conv2d(16, 32, 3, padding=1),
                              torch.nn.BatchNorm2d(32), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    gm = Pipeline.parse(f"{LOWERINGS[form]},fold,cleanup").run(twistc.trace(net, (torch.randn(1, 3, 8, 8),)))
    twistc.export_onnx(gm, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx")
    stored = sum(int(np.prod(t.dims)) for t in onnx.load(tmp_path / "m.onnx").graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT)
    report = build_report(twistc.state_of(gm), pipeline="", original=net, compiled=gm)
    assert report["model"]["params_after"] == stored
    for layer in report["layers"]:
        if layer["lowering"]:
            module = gm.get_submodule(twistc.state_of(gm).layers[layer["name"]].module)
            assert layer["params_after"] == sum(t.numel() for n, t in (*module.named_parameters(),
                                                                      *module.named_buffers()) if "bias" not in n)


class Scaled(torch.nn.Module):
    """Outputs of order `scale` (or exactly `constant` everywhere); `perturb` changes them by that share."""

    def __init__(self, scale=1e-6, perturb=0.0, constant=None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.scale, self.perturb, self.constant = scale, perturb, constant

    def forward(self, x):
        y = self.conv(x).mean((2, 3)) * self.scale
        if self.constant is not None:
            return y * 0 + self.constant
        return y * (1 + self.perturb)


def test_the_onnx_check_scales_with_the_output_and_warns_when_it_proves_little(tmp_path, caplog):
    x = (torch.randn(1, 3, 8, 8),)
    twistc.export_onnx(Scaled(), x, tmp_path / "ok.onnx")  # outputs of 1e-6, exported exactly: passes...
    assert "outputs are at most" in caplog.text  # ...with a warning that the check proves little
    path = tmp_path / "wrong.onnx"
    twistc.export_onnx(Scaled(perturb=0.01), x, path)
    with pytest.raises(ExportCheckError, match="differs from PyTorch"):  # 1% off, at 1e-6: caught
        twistc.export.check_onnx(Scaled(), x, path)
    check = twistc.export_onnx(Scaled(constant=0.0), x, tmp_path / "zero.onnx")
    assert any("constant (0 everywhere)" in w for w in check.warnings)
    assert check.to_json()["criterion"].startswith("|onnxruntime - pytorch| <= atol * max|pytorch|")
