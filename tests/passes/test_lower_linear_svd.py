import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twistc
from twistc.decomp.svd import truncated_svd
from twistc.pipeline import Pipeline
from twistc.state import state_of

X = torch.randn(2, 5, 12)  # batch, tokens, features


class FunctionalLinear(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 12))
        self.bias = nn.Parameter(torch.randn(10)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _model(kind: str, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return (nn.Sequential(nn.Linear(12, 10, bias=bias)) if kind == "module" else FunctionalLinear(bias)).eval()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["module", "functional"])
def test_full_rank_is_exact_and_truncated_rank_is_the_svd(kind, bias, tmp_path):
    model = _model(kind, bias)
    name = "0" if kind == "module" else "weight"
    gm = Pipeline.parse("lower-linear-svd{ranks=10},cleanup").run(twistc.trace(model, (X,)))
    torch.testing.assert_close(gm(X), model(X), atol=1e-5, rtol=1e-5)
    record = state_of(gm).layers[name]
    assert record.lowering == "svd-linear" and record.geometry.in_hw == (5, 1)
    assert record.after.params == 10 * (12 + 10) and record.after.macs == 5 * 10 * 22  # per sample: 5 tokens

    truncated = Pipeline.parse("lower-linear-svd{ranks=3},cleanup").run(twistc.trace(model, (X,)))
    params = {k.removeprefix("0."): v.detach() for k, v in model.named_parameters()}
    factors = truncated_svd(params["weight"], 3)
    expected = F.linear(X, factors.u @ factors.v, params.get("bias"))
    torch.testing.assert_close(truncated(X), expected, atol=1e-5, rtol=1e-5)
    check = twistc.export_onnx(truncated, (X,), tmp_path / "m.onnx")
    assert check.max_abs_diff < 1e-5
    assert not Pipeline.parse("lower-linear-svd{ranks=3}").stages[0](truncated).modified  # nothing left to lower


def test_deeptwist_svd_trains_convs_and_linears_and_lowers_both(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(5, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # 5 channels: not a stem, which stays whole
    x = torch.randn(1, 5, 8, 8)
    data = [(torch.randn(4, 5, 8, 8), torch.randint(0, 4, (4,))) for _ in range(3)]
    ctx = twistc.RunContext(train_data=lambda: data, progress=False)
    gm = Pipeline.parse("deeptwist{decomp=svd,ratio=1.5,period=2},train{epochs=1}").run(twistc.trace(net, (x,)), ctx)
    trained = gm.eval()(x)
    gm = Pipeline.parse("lower-conv-svd,lower-linear-svd,fold,cleanup").run(gm)
    torch.testing.assert_close(gm(x), trained, atol=1e-5, rtol=1e-5)
    layers = list(state_of(gm).layers.values())
    assert [r.lowering for r in layers] == ["svd-conv", "svd-linear", None]
    assert not any(n.endswith("6.weight_projection") for n, _ in gm.named_modules())  # deeptwist left the head


def test_conv_passes_and_attention_leave_linears_with_a_reason():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(12, 2, batch_first=True)
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head(self.mha(x, x, x)[0])

    gm = Pipeline.parse("lower-conv-tucker{ratio=2}").run(twistc.trace(Attention().eval(), (X,)))
    layers = state_of(gm).layers
    assert layers["head"].skip_reason == "Linear: lower-conv-tucker rewrites Conv2d and Conv1d layers"
    assert "in_proj_weight" in layers["mha.in_proj"].skip_reason and layers["mha.out_proj"].lowering is None


class MatmulLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 12))
        self.v = nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        return torch.matmul(torch.relu(x @ self.w.T), self.v.t())


def test_x_matmul_w_transposed_is_a_linear_layer():
    torch.manual_seed(0)
    model = MatmulLayers().eval()
    gm = Pipeline.parse("lower-linear-svd{ratio=1.2},lower-linear-svd{ranks=3,layers=v},cleanup").run(
        twistc.trace(model, (X,)))
    layers = state_of(gm).layers
    assert [layers[n].lowering for n in ("w", "v")] == ["svd-linear", "svd-linear"]  # v, the head: explicit ranks
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # the weights and their .T are gone
    full = Pipeline.parse("lower-linear-svd{ranks=4},cleanup").run(twistc.trace(model, (X,)))
    assert state_of(full).plan.get("v").ranks == (4,)

    class Mean(nn.Module):  # scores per sequence, for the train stage
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).mean(1)

    data = [(torch.randn(4, 5, 12), torch.randint(0, 4, (4,))) for _ in range(2)]
    ctx = twistc.RunContext(train_data=lambda: data, progress=False)
    gm = Pipeline.parse("deeptwist{decomp=svd,ratio=1.2,period=1},train{epochs=1}").run(
        twistc.trace(Mean(MatmulLayers()), (X,)), ctx)
    trained = gm.eval()(X)
    gm = Pipeline.parse("lower-linear-svd,cleanup").run(gm)
    torch.testing.assert_close(gm(X), trained, atol=1e-5, rtol=1e-5)
