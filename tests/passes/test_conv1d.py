"""Conv1d through the Tucker-2 chain and the SVD pair (as Conv1d layers), and DeepTwist on it."""
import pytest
import torch
from torch import nn

import twistc
from twistc.decomp.svd import lowered, truncated_svd, unlowered
from twistc.decomp.tucker import tucker2
from twistc.pipeline import Pipeline
from twistc.state import state_of

X = torch.randn(2, 6, 20)
CASES = {"bias": dict(kernel_size=3, padding=1), "strided": dict(kernel_size=5, stride=2, padding=2, bias=False),
         "same-dilated": dict(kernel_size=3, padding="same", dilation=2),
         "reflect-even": dict(kernel_size=4, padding=3, padding_mode="reflect"),
         "circular-strided": dict(kernel_size=3, padding=1, padding_mode="circular", stride=2)}


def _with_weight(case: str, conv: nn.Conv1d, weight: torch.Tensor) -> nn.Conv1d:
    twin = nn.Conv1d(6, 8, **CASES[case]).eval()
    with torch.no_grad():
        twin.weight.copy_(weight)
        if conv.bias is not None:
            twin.bias.copy_(conv.bias)
    return twin


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("spec", ["lower-conv-tucker{ranks=%s}", "lower-conv-svd{ranks=%s}",
                                  "lower-conv-svd{ranks=%s,order=tap-major}"])
def test_full_rank_is_exact_and_truncated_rank_is_the_math(case, spec, tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 8, **CASES[case]).eval()
    tucker = spec.startswith("lower-conv-tucker")
    full = Pipeline.parse(spec % ("8x6" if tucker else "8")).run(twistc.trace(nn.Sequential(conv), (X,)))
    torch.testing.assert_close(full(X), conv(X), atol=1e-5, rtol=1e-5)
    assert {type(m) for n, m in full.named_modules() if n.startswith("0.")} == {nn.Conv1d}
    assert state_of(full).layers["0"].geometry.kind == "Conv1d"

    low = Pipeline.parse(spec % ("3x2" if tucker else "2")).run(twistc.trace(nn.Sequential(conv), (X,)))
    w = conv.weight.detach()
    if tucker:
        approx = tucker2(w, (3, 2)).reconstruct()
    else:
        order = "tap-major" if "tap-major" in spec else "channel-major"
        f = truncated_svd(lowered(w, order), 2)
        approx = unlowered(f.u @ f.v, tuple(w.shape), order)
    torch.testing.assert_close(low(X), _with_weight(case, conv, approx)(X), atol=1e-5, rtol=1e-5)
    check = twistc.export_onnx(low, (X,), tmp_path / "m.onnx")
    assert check.max_abs_diff < 1e-5


def test_deeptwist_on_conv1d_lowers_exactly_and_im2col_leaves_it_with_a_reason():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(6, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 16, 5, padding=2, padding_mode="reflect"),
                        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 4))
    data = [(torch.randn(4, 6, 20), torch.randint(0, 4, (4,))) for _ in range(3)]
    ctx = twistc.RunContext(train_data=lambda: data, progress=False)
    gm = Pipeline.parse("deeptwist{ratio=1.5,period=2},train{epochs=1}").run(twistc.trace(net, (X,)), ctx)
    trained = gm.eval()(X)
    gm = Pipeline.parse("lower-conv-tucker,cleanup").run(gm)
    torch.testing.assert_close(gm(X), trained, atol=1e-5, rtol=1e-5)
    assert [state_of(gm).layers[n].lowering for n in ("0", "2")] == ["tucker-chain", "tucker-chain"]
    im2col = Pipeline.parse("lower-conv-svd{ratio=2,form=im2col}").run(twistc.trace(net, (X,)))
    assert state_of(im2col).layers["0"].skip_reason == "Conv1d: lower-conv-svd{form=im2col} lowers Conv2d layers"
