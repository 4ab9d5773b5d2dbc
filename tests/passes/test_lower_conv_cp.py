import pytest
import torch
from torch import nn

import twistc
from twistc.decomp.cp import CpFactors, cp
from twistc.pipeline import Pipeline
from twistc.state import state_of
from models_for_tests import CONV_CASES

T, S = 8, 6
X = torch.randn(2, S, 11, 10, dtype=torch.float64)


def _known_cp_kernel(rank: int, kernel=(3, 3)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in (T, S, *kernel)]
    return CpFactors(*factors).reconstruct()


def test_cp_is_exact_at_the_kernels_cp_rank():
    kernel = _known_cp_kernel(3)
    fitted = cp(kernel, 3)
    assert float((fitted.reconstruct() - kernel).norm() / kernel.norm()) < 1e-6
    assert fitted.rank == 3 and fitted.out.dtype == torch.float64


@pytest.mark.parametrize("case", CONV_CASES)
def test_lowering_computes_the_conv_of_the_cp_reconstruction(case):
    """Exact lowering of every sampling (stride, padding and its modes, dilation, 'same', odd kernels):
    on a kernel of CP rank 3 the chain equals the conv; at a truncated rank it equals the conv of the
    reconstruction."""
    torch.manual_seed(0)
    conv = nn.Conv2d(S, T, **CONV_CASES[case]).double().eval()
    with torch.no_grad():
        conv.weight.copy_(_known_cp_kernel(3, conv.kernel_size))
    expected = conv(X)
    gm = Pipeline.parse("lower-conv-cp{ranks=3}").run(twistc.trace(nn.Sequential(conv), (X,)))
    assert [n.target.rpartition(".")[2] for n in gm.graph.nodes if n.op == "call_module"] == [
        "reduce", "rows", "cols", "expand"]
    torch.testing.assert_close(gm(X), expected, atol=1e-6, rtol=1e-5)  # ALS fits to ~1e-8
    record = state_of(gm).layers["0"]
    assert record.approx_error < 1e-6 and record.after.params == 3 * (T + S + sum(conv.kernel_size))

    truncated = Pipeline.parse("lower-conv-cp{ranks=2}").run(twistc.trace(nn.Sequential(conv), (X,)))
    with torch.no_grad():
        conv.weight.copy_(cp(conv.weight, 2).reconstruct())
    torch.testing.assert_close(truncated(X), conv(X), atol=1e-8, rtol=1e-6)


def test_deeptwist_with_cp_trains_and_lowers_exactly(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(4)]
    ctx = twistc.RunContext(train_data=lambda: data, progress=False)
    gm = Pipeline.parse("deeptwist{decomp=cp,ranks=4,period=2},train{epochs=1}").run(twistc.trace(net, (x,)), ctx)
    trained = gm.eval()(x)  # eval: a training-mode forward would count as a DeepTwist step
    gm = Pipeline.parse("lower-conv-cp,cleanup").run(gm)
    torch.testing.assert_close(gm(x), trained, atol=1e-4, rtol=1e-4)
    layers = state_of(gm).layers
    assert {layers[n].lowering for n in ("0", "2")} == {"cp-chain"} and layers["5"].skip_reason.startswith("Linear: ")
    check = twistc.export_onnx(gm, (x,), tmp_path / "m.onnx")
    assert check.max_abs_diff < 1e-4


def test_cp_skips_1x1_convs_and_refuses_energy():
    gm = twistc.trace(nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3)), (torch.randn(1, 4, 6, 6),))
    gm = Pipeline.parse("lower-conv-cp{ratio=2}").run(gm)
    assert "use svd" in state_of(gm).layers["0"].skip_reason
    assert state_of(gm).layers["1"].lowering == "cp-chain"
    with pytest.raises(twistc.TwistcError, match="do not choose CP ranks"):
        Pipeline.parse("lower-conv-cp{energy=0.9}").run(
            twistc.trace(nn.Sequential(nn.Conv2d(8, 8, 3)), (torch.randn(1, 8, 6, 6),)))
