"""Convs that share a weight (one conv applied twice, or tied weights) are lowered once and the result reused."""
import torch
from torch import nn

from twistc import Pipeline, state_of, trace
from twistc.decomp.tucker import TuckerConv
from twistc.projection import LowRankProjection
from twistc.report import build_report
from twistc.train import train


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(torch.relu(self.stem(x)))))


class Tied(nn.Module):
    def __init__(self, same_bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=not same_bias)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=not same_bias)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_conv_applied_twice_is_lowered_once_and_called_twice():
    x = torch.randn(2, 3, 8, 8)
    model = Twice().eval()
    gm = Pipeline.parse("lower-conv-tucker{ranks=8x8,layers=conv},cleanup").run(trace(model, (x[:1],)))
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)  # full rank: exact
    assert [name for name, m in gm.named_modules() if isinstance(m, TuckerConv)] == ["conv"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets.count("conv.core") == 1 and targets.count("conv") == 1  # the chain, then the module again
    report = build_report(state_of(gm), pipeline="", original=model, compiled=gm)
    assert report["totals"]["params_before"] == 8 * 3 * 9 + 8 * 8 * 9  # the shared weight counts once


def test_deeptwist_projects_a_shared_weight_once_per_step():
    gm = Pipeline.parse("deeptwist{ratio=2,period=2}").run(trace(Twice(), (torch.randn(1, 3, 8, 8),)))
    assert [m.layer for m in gm.modules() if isinstance(m, LowRankProjection)] == ["conv"]  # the stem stays dense
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 8, (4,), generator=g)) for _ in range(3)]
    train(gm, lambda: data, 2, progress=False, loss_fn=lambda out, y: nn.functional.cross_entropy(out.mean((2, 3)), y))
    assert all(int(p.step) == 6 for p in gm.modules() if isinstance(p, LowRankProjection))
    x = torch.randn(2, 3, 8, 8)
    expected = gm(x)
    lowered = Pipeline.parse("lower-conv-tucker,cleanup").run(gm)
    torch.testing.assert_close(lowered(x), expected, atol=1e-5, rtol=1e-5)


def test_tied_weights_stay_tied_and_count_once():
    x = torch.randn(2, 8, 6, 6)
    model = Tied(same_bias=True).eval()
    gm = Pipeline.parse("lower-conv-tucker{ranks=8x8},cleanup").run(trace(model, (x[:1],)))
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
    assert len([m for m in gm.modules() if isinstance(m, TuckerConv)]) == 1
    report = build_report(state_of(gm), pipeline="", original=model, compiled=gm)
    b = next(layer for layer in report["layers"] if layer["name"] == "b")
    assert b["shared_with"] == "a" and b["skip_reason"] == "shares its weight with a"
    assert report["totals"]["params_before"] == 8 * 8 * 9 and report["compressed_layers"]["count"] == 1


def test_tied_weights_with_their_own_biases_are_refused_by_name():
    model = Tied(same_bias=False).eval()
    gm = Pipeline.parse("lower-conv-tucker{ratio=2},cleanup").run(trace(model, (torch.randn(1, 8, 6, 6),)))
    record = state_of(gm).layers["a"]
    assert record.lowering is None and "shares its weight with convs that sample or add bias differently" in \
        record.skip_reason


class TiedEmbedding(nn.Module):
    """A language-model-like net whose output layer reuses the embedding's weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, 40, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.relu(self.mix(self.embed(tokens))))


def test_a_weight_tied_to_an_embedding_is_left_dense_by_name_and_the_totals_stay_true():
    tokens = torch.randint(0, 40, (1, 6))
    model = TiedEmbedding().eval()
    gm = Pipeline.parse("lower-linear-svd{ratio=2},lower-linear-svd{ranks=4,layers=out},cleanup").run(
        trace(model, (tokens,)))
    out = state_of(gm).layers["out"]
    assert out.lowering is None and out.skip_reason.startswith("its weight is tied to embed.weight")
    assert state_of(gm).layers["mix"].lowering == "svd-linear"
    report = build_report(state_of(gm), pipeline="", original=model, compiled=gm)
    stored = sum(t.numel() for t in gm.state_dict().values())  # tied: one tensor, counted once by the report
    assert report["model"]["params_after"] <= report["model"]["params_before"]
    assert report["model"]["params_after"] == stored - 16 * 40  # state_dict lists the tied tensor twice
