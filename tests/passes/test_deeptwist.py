import pytest
import torch
import torch.nn.functional as F
from torch import nn

import twistc
from twistc.errors import NonFiniteError
from twistc.projection import LowRankProjection
from twistc.passes.deeptwist import DeepTwist
from twistc.pipeline import Pipeline, RunContext
from twistc.plan import LayerPlan
from models_for_tests import Classifier, FunctionalConv, Net

X = torch.randn(4, 3, 12, 12)


def _projected(spec="deeptwist{ranks=3x2,period=7,layers=conv2}", model=None):
    gm = twistc.trace(model or Net().eval(), (X,))
    return Pipeline.parse(spec).run(gm)


def _multilinear_rank(w):
    return (int(torch.linalg.matrix_rank(w.reshape(w.shape[0], -1).double(), rtol=1e-6)),
            int(torch.linalg.matrix_rank(w.transpose(0, 1).reshape(w.shape[1], -1).double(), rtol=1e-6)))


def test_graph_routes_weight_through_projection_and_counter_is_in_state_dict():
    gm = _projected()
    proj_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv2.weight_projection"]
    assert len(proj_nodes) == 1
    (node,) = proj_nodes
    assert node.args[0].op == "get_attr" and node.args[0].target == "conv2.weight"
    (conv,) = node.users
    assert conv.op == "call_function" and conv.target in (F.conv2d, torch.conv2d)
    keys = gm.state_dict().keys()
    assert {"conv2.weight_projection.step", "conv2.weight_projection.distortions"} <= set(keys)
    assert "conv2.weight" in keys  # the model keeps its parameters and shape
    assert isinstance(gm.conv2.weight_projection, LowRankProjection)


def test_distortions_exactly_every_period_and_only_in_training_forwards():
    torch.manual_seed(0)
    gm = _projected()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.0)
    weight = gm.get_parameter("conv2.weight")
    changed_at, previous = [], weight.detach().clone()
    gm.train()
    for step in range(1, 41):
        loss = gm(X).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if not torch.equal(weight, previous):
            changed_at.append(step)
        previous = weight.detach().clone()
        gm.eval()
        gm(X)  # eval forwards do not count
        gm.train()
        with torch.no_grad():
            gm(X)  # nor do training-mode forwards without grad
    assert changed_at == [7, 14, 21, 28, 35]
    projection = gm.conv2.weight_projection
    assert int(projection.step) == 40 and int(projection.distortions) == 5
    assert _multilinear_rank(weight.detach()) == (3, 2)


def test_weights_move_between_distortions_with_a_real_optimizer():
    gm = _projected("deeptwist{ranks=3x2,period=5,layers=conv2}")
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm.train()
    for _ in range(6):
        opt.zero_grad()
        gm(X).square().mean().backward()
        opt.step()
    assert _multilinear_rank(gm.get_parameter("conv2.weight").detach()) != (3, 2)  # moved off after step 5
    twistc.final_projection(gm)
    assert _multilinear_rank(gm.get_parameter("conv2.weight").detach()) == (3, 2)
    assert int(gm.conv2.weight_projection.final_projections) == 1


@pytest.mark.parametrize("functional", [False, True])
def test_lowered_model_equals_projected_model(functional):
    # the functional conv reads a 1x1 conv's output: a stem keeps every value it reads
    model = nn.Sequential(nn.Conv2d(3, 5, 1), FunctionalConv(nn.Conv2d(5, 8, 3, padding=1))) if functional else Net()
    gm = _projected("deeptwist{ratio=2,period=3}", model.eval())
    ctx = RunContext(train_data=lambda: [(X, torch.zeros(4, dtype=torch.long))] * 4, progress=False)
    loss = lambda out, y: out.square().mean()
    twistc.train(gm, ctx.train_data, epochs=2, lr=0.01, loss_fn=loss, progress=False)
    gm.eval()
    projected = gm(X)
    ranks = {p.layer: p.ranks for p in gm.modules() if isinstance(p, LowRankProjection)}
    assert ranks
    for p in gm.modules():
        if isinstance(p, LowRankProjection):
            w = gm.get_parameter(p.weight_name).detach()
            assert all(r <= t for r, t in zip(_multilinear_rank(w), p.ranks))
    gm = Pipeline.parse("lower-conv-tucker,cleanup").run(gm)
    assert not any(isinstance(m, LowRankProjection) for m in gm.modules())
    torch.testing.assert_close(gm(X), projected, atol=1e-5, rtol=1e-5)
    state = twistc.state_of(gm)
    assert all(state.plan.get(name).ranks == r and state.layers[name].lowering == "tucker-chain"
               for name, r in ranks.items())


def test_train_stage_counts_steps_and_distortions_and_calls_train_data_each_epoch():
    gm = _projected("deeptwist{ratio=2,period=4}", Classifier().eval())
    calls = []

    def batches():
        calls.append(1)
        for _ in range(5):  # a generator: no len()
            yield X, torch.randint(0, 4, (4,))

    ctx = RunContext(train_data=batches, progress=False)
    Pipeline.parse("train{epochs=3,lr=0.01}").run(gm, ctx)
    result = ctx.results["train"]
    assert len(calls) == 3 and result.steps == 15 and result.distortions == 3  # steps 4, 8, 12
    assert result.final_projections == 1  # conv2; the stem conv1 keeps every value it reads, 1x1 and grouped
    # convs are skipped
    assert len(result.distortion_changes) == 3 and 0 < result.distortion_changes[0] < 1
    assert result.distortion_changes[1] < result.distortion_changes[0]  # 4 small steps after a projection
    Pipeline.parse("train{epochs=1,lr=0.01}").run(gm, ctx)  # steps 16 and 20; appended to the first
    assert len(ctx.results["train"].distortion_changes) == 5 and ctx.results["train"].to_json()["distortion_changes"]


def test_lowering_after_deeptwist_rejects_conflicting_ranks():
    gm = _projected("deeptwist{ranks=3x2,period=7,layers=conv2}")
    with pytest.raises(twistc.TwistcError, match="deeptwist trained the layer with ranks"):
        Pipeline.parse("lower-conv-tucker{ranks=4x4,layers=conv2}").run(gm)


def test_non_finite_weight_names_layer_and_step():
    gm = _projected("deeptwist{ranks=3x2,period=2,layers=conv2}")
    gm.train()
    gm(X).sum().backward()
    with torch.no_grad():
        gm.get_parameter("conv2.weight")[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"layer conv2: .* step 2"):
        gm(X)


def test_non_finite_loss_stops_training_with_the_step():
    gm = _projected("deeptwist{ratio=2,period=100}", Classifier().eval())
    data = lambda: [(X * (float("inf") if i == 2 else 1), torch.zeros(4, dtype=torch.long)) for i in range(4)]
    with pytest.raises(NonFiniteError, match="step 3"):
        twistc.train(gm, data, epochs=1, progress=False)


def test_a_lower_period_late_in_training_distorts_on_its_own_schedule():
    torch.manual_seed(0)
    gm = _projected("deeptwist{ranks=3x2,period=7,late_period=3,late_after=15,layers=conv2}")
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.01)
    weight, changed_at = gm.get_parameter("conv2.weight"), []
    gm.train()
    for step in range(1, 25):
        previous = weight.detach().clone()
        loss = gm(X).square().mean()
        if not torch.equal(weight, previous):  # the projection acts in the forward
            changed_at.append(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert changed_at == [7, 14, 18, 21, 24]
    assert int(gm.conv2.weight_projection.distortions) == 5
    for bad, message in (("deeptwist{late_period=3}", "together"),
                         ("deeptwist{late_period=0,late_after=5}", "late_period must be >= 1")):
        with pytest.raises(twistc.TwistcError, match=message):
            Pipeline.parse(bad)


def test_an_adaptive_period_follows_the_change_each_projection_makes():
    torch.manual_seed(0)
    gm = _projected("deeptwist{ranks=3x2,period=2,target_change=0.01,layers=conv2}")
    projection = gm.conv2.weight_projection
    weight, changed_at, periods = gm.get_parameter("conv2.weight"), [], []
    gm.train()
    for step in range(1, 20):  # no optimizer: after the first projection the kernel is already low-rank
        previous = weight.detach().clone()
        gm(X)
        if projection.distorted:
            changed_at.append(step)
            periods.append(int(projection.current_period))
        assert projection.distorted == (step in changed_at) and (step not in changed_at or step == 2
                                                                  or torch.allclose(weight, previous, atol=1e-5))
    # the first projection removes far more than 1%: the period halves (2 -> 1); afterwards each removes
    # almost nothing, so it doubles, at most 2x at a time
    assert changed_at == [2, 3, 5, 9, 17] and periods == [1, 2, 4, 8, 16]
    assert {"current_period", "next_at"} <= {n.split(".")[-1] for n, _ in gm.named_buffers()}
    for bad, message in (("deeptwist{target_change=1.5}", "target_change must be in"),
                         ("deeptwist{target_change=0.01,late_period=3,late_after=5}", "leave out late_period")):
        with pytest.raises(twistc.TwistcError, match=message):
            Pipeline.parse(bad)


def test_options_are_validated_and_second_run_changes_nothing():
    for bad in ("deeptwist{period=0}", "deeptwist{decomp=block-term}", "deeptwist{ratio=1}", "deeptwist{ranks=0x2}",
                "deeptwist{ratio=2,ranks=3x3}"):
        with pytest.raises(twistc.TwistcError):
            Pipeline.parse(bad)
    gm = _projected()
    assert DeepTwist(ranks=(3, 2), layers="conv2")(gm).modified is False
    with pytest.raises(twistc.TwistcError, match="outside"):
        _projected("deeptwist{ranks=9x9}")  # conv1 has only 3 input channels


def test_reset_momentum_clears_velocity_of_projected_weights_after_a_distortion(monkeypatch):
    gm = _projected("deeptwist{ranks=3x2,period=3,layers=conv2}", Classifier().eval())
    data = lambda: [(X, torch.randint(0, 16, (4,))) for _ in range(3)]
    seen = []  # |momentum| of conv2.weight right before each optimizer step (None before the first)
    real_step = torch.optim.SGD.step

    def spy(self, *a, **k):
        buffer = self.state.get(gm.get_parameter("conv2.weight"), {}).get("momentum_buffer")
        seen.append(None if buffer is None else buffer.abs().sum().item())
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    twistc.train(gm, data, epochs=1, lr=0.1, progress=False, reset_momentum=True, finalize=False)
    assert seen[0] is None and seen[1] > 0 and seen[2] == 0  # cleared at the distortion (step 3) only


def test_recalibrate_batchnorm_matches_statistics_of_the_current_weights():
    from twistc.train import recalibrate_batchnorm
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(16, 3, 8, 8) * 3 + 1
    assert recalibrate_batchnorm(model, lambda: [(x[:8], None), (x[8:], None), (x, None)], batches=2) == 2
    features = model[0](x).detach()
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)
    assert model[1].momentum == 0.1 and not model.training


def test_final_projection_change_is_measured_once_and_reported():
    gm = _projected()
    weight = gm.get_parameter("conv2.weight").detach().clone()
    projection = gm.conv2.weight_projection
    expected = torch.linalg.vector_norm(weight - projection.plan.reconstruct(weight)) / torch.linalg.vector_norm(weight)
    assert twistc.final_projection(gm) == 1
    assert float(projection.change) == pytest.approx(float(expected), rel=1e-5) and 0 < float(expected) < 1
    gm = Pipeline.parse("lower-conv-tucker,cleanup").run(gm)  # re-projects an exact low-rank kernel
    record = twistc.state_of(gm).layers["conv2"]
    assert record.final_projection_change == pytest.approx(float(expected), rel=1e-5)
    assert record.to_json()["final_projection_change"] == record.final_projection_change
    assert twistc.state_of(gm).layers["conv1"].final_projection_change is None


def test_the_plan_is_the_one_home_of_a_projections_ranks():
    gm = twistc.trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), (torch.randn(1, 3, 8, 8),))
    gm = Pipeline.parse("deeptwist{ranks=4x2}").run(gm)
    projection = gm.get_submodule("0.weight_projection")
    assert projection.ranks == (4, 2) and twistc.state_of(gm).plan.get("0") is projection.plan
    twistc.state_of(gm).plan.set("0", LayerPlan("tucker", (2, 2), "tucker-chain"))
    assert projection.ranks == (2, 2)


def test_a_ramp_lowers_the_ranks_gradually_from_full_to_the_plans():
    torch.manual_seed(0)
    gm = _projected("deeptwist{ranks=3x2,period=2,ramp=8,layers=conv2}")
    projection = gm.conv2.weight_projection
    assert projection.full_ranks == (16, 8)
    schedule = [projection.ranks_at(step) for step in range(0, 11)]
    assert schedule[0] == (16, 8) and all(r == (3, 2) for r in schedule[8:])
    assert all(a >= b for before, after in zip(schedule, schedule[1:]) for a, b in zip(before, after))
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    weight, kept = gm.get_parameter("conv2.weight"), {}
    gm.train()
    for step in range(1, 11):
        loss = gm(X).square().mean()
        if projection.distorted:  # the forward projected: the kernel is at this step's ranks
            kept[step] = _multilinear_rank(weight.detach())
            assert projection.fitted is None or step >= 8  # a ramp's factors are never reused by a lowering
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert kept == {step: projection.ranks_at(step) for step in (2, 4, 6, 8, 10)}
    assert kept[2] > kept[4] > kept[6] > kept[8] == (3, 2)
    projection.finalize_(weight)  # as the train stage ends
    assert _multilinear_rank(weight.detach()) == (3, 2) and projection.fitted is not None
    gm.eval()
    projected = gm(X)
    lowered = Pipeline.parse("lower-conv-tucker,cleanup").run(gm)
    torch.testing.assert_close(lowered(X), projected, atol=1e-5, rtol=1e-5)  # at the plan's ranks after the ramp
    assert twistc.state_of(lowered).plan.get("conv2").ranks == (3, 2)


def test_a_ramp_needs_a_decomposition_with_a_full_rank_form():
    with pytest.raises(twistc.TwistcError, match="ramp must be >= 0"):
        Pipeline.parse("deeptwist{ramp=-1}")
    with pytest.raises(twistc.TwistcError, match="ramp needs a decomposition with a full-rank form"):
        _projected("deeptwist{decomp=cp,ranks=4,ramp=10,layers=conv2}")
