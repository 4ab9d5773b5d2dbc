"""Every decomposition and every form in the registry keeps the same promises."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import twistc
from twistc.decomp import DECOMPOSITIONS, FORMS
from twistc.decomp.cp import CpFactors
from twistc.convs import conv_sites
from twistc.latency import build, layer_input
from twistc.passes.plan_latency import PLANNABLE, PlanLatency
from twistc.pipeline import Pipeline
from twistc.counting import count_weights
from twistc.report import support_table
from twistc.state import state_of

T, S = 8, 6
X = torch.randn(2, S, 9, 9, dtype=torch.float64)
# each decomposition's options at a rank where it is exact on _kernel(name)
FULL = {"tucker": "ranks=8x6", "svd": "ranks=8", "tiled-svd": "ranks=8,tile=8x18", "cp": "ranks=3"}


def _kernel(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if name == "cp":  # CP is exact only at the kernel's CP rank
        return CpFactors(*(torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (T, S, 3, 3))).reconstruct()
    return torch.randn(T, S, 3, 3, generator=g, dtype=torch.float64)


def test_every_decomposition_is_covered_here():
    assert set(FULL) == set(DECOMPOSITIONS)


def _layer(kind: str, name: str) -> tuple[nn.Module, torch.Tensor]:
    """A layer of `kind` whose weight the decomposition `name` represents exactly at FULL[name], and its input."""
    if kind == "Linear":
        layer, x = nn.Linear(S * 9, T), torch.randn(2, 5, S * 9, dtype=torch.float64)
        weight = _kernel(name).reshape(T, S * 9)
    elif kind == "Conv1d":
        layer, x = nn.Conv1d(S, T, 3, padding=1), torch.randn(2, S, 9, dtype=torch.float64)
        weight = torch.randn(T, S, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    else:
        layer, x, weight = nn.Conv2d(S, T, 3, padding=1), X, _kernel(name)
    layer = layer.double().eval()
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer, x


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_lowers_exactly_and_costs_what_it_stores(form):
    decomposition, row = FORMS[form]
    method = ",im2col=slices" if "slices" in row.methods else ""  # onehot im2col also stores its one-hot kernels
    for kind in row.kinds:
        layer, x = _layer(kind, decomposition.name)
        spec = f"lower{{forms={form},{FULL[decomposition.name]}{method}}}"
        gm = Pipeline.parse(spec).run(twistc.trace(nn.Sequential(layer), (x,)))
        torch.testing.assert_close(gm(x), layer(x), atol=1e-6, rtol=1e-5)
        record, entry = state_of(gm).layers["0"], state_of(gm).plan.get("0")
        assert entry.decomp == decomposition.name and record.lowering == entry.lowering == form
        assert entry.cost(record.geometry).params == count_weights(gm.get_submodule(record.module))


@pytest.mark.parametrize("form", list(FORMS))
def test_plan_latency_offers_every_untiled_form_and_times_what_it_builds(form):
    """plan-latency's candidates come from the table: every form built one way only (no im2col method or tiling
    to choose) is offered for each of its kinds, and the module it times stores what the candidate's cost says."""
    decomposition, row = FORMS[form]
    assert (form in PLANNABLE) == (not row.methods)
    if row.methods:
        return
    for kind in row.kinds:  # 64 channels: large enough that every form saves weights; a layer after it: no head
        layer, x = {"Linear": (nn.Linear(64, 64), torch.randn(1, 5, 64)),
                    "Conv1d": (nn.Conv1d(64, 64, 3, padding=1), torch.randn(1, 64, 9)),
                    "Conv2d": (nn.Conv2d(64, 64, 3, padding=1), torch.randn(1, 64, 9, 9))}[kind]
        gm = twistc.trace(nn.Sequential(layer, nn.ReLU(), copy.deepcopy(layer)), (x,))
        site = conv_sites(gm)[0]
        offered = PlanLatency(speedup=2, forms=form).candidates(gm, site)
        assert offered and {e.lowering for e in offered} == {form}
        for entry in offered:
            module = build(site.geometry, entry)
            module(layer_input(site.geometry, 1, torch.float32))
            assert count_weights(module) == entry.cost(site.geometry).params


@pytest.mark.parametrize("name", list(DECOMPOSITIONS))
def test_a_deeptwist_trained_layer_lowers_exactly(name):
    """Train with the projection, then lower: the lowered model computes what the trained one did."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten())
    x = torch.randn(1, 3, 6, 6)
    data = [(torch.randn(4, 3, 6, 6), torch.randint(0, 8, (4,))) for _ in range(3)]
    layout = ",grid=1x2" if DECOMPOSITIONS[name].tiled else ""
    ctx = twistc.RunContext(train_data=lambda: data, progress=False)
    spec = f"deeptwist{{decomp={name},ratio=2,period=2{layout}}},train{{epochs=1}}"
    gm = Pipeline.parse(spec).run(twistc.trace(net, (x,)), ctx)
    trained = gm.eval()(x)  # eval: a training-mode forward would count as a DeepTwist step
    gm = Pipeline.parse("lower,cleanup").run(gm)
    assert {e.decomp for e in state_of(gm).plan.layers.values()} == {name}
    torch.testing.assert_close(gm(x), trained, atol=1e-4, rtol=1e-4)


def test_readme_support_table_is_current():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert support_table() in readme, "regenerate it: python -c 'from twistc.report import support_table; print(support_table())'"
