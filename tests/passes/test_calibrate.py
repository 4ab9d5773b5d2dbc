"""calibrate and fit=activation through the passes: the statistics are the layer inputs' second moments,
every data-aware form is exact at full rank, truncated fits beat kernel fits on the output, and a
missing or degenerate calibration is an error or a clean fallback."""
import logging

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from twistc import Pipeline, RunContext, state_of, trace
from twistc.distributed import leave
from twistc.errors import SpecError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(5, 12, 3, padding=1, stride=2)  # 5 channels: not a stem, whose input stays whole
        self.point = nn.Conv2d(12, 10, 1)
        self.hidden = nn.Linear(10 * 16, 24)
        self.fc = nn.Linear(24, 8)

    def forward(self, x):
        return self.fc(F.relu(self.hidden(F.relu(self.point(F.relu(self.conv(x)))).flatten(1))))


def _data(n=4, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(8, 5, 8, 8, generator=g) * (torch.tensor([3.0, 1.0, 0.2, 0.05, 0.5]) if scale is None else scale
                                                   )[None, :, None, None]
        batches.append((x + 0.8 * x.roll(1, 1), torch.randint(0, 8, (8,), generator=g)))
    return batches


def _run(spec, data=None):
    data = _data() if data is None else data
    net = Net().eval()
    gm = trace(Net().eval(), (data[0][0][:1],))
    gm = Pipeline.parse(spec).run(gm, RunContext(train_data=lambda: data, progress=False))
    return net, gm, data


def test_calibrate_collects_each_layers_input_second_moment():
    net, gm, data = _run("calibrate{batches=3}")
    stats = state_of(gm).calibration
    x = torch.cat([b[0] for b in data[:3]])
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 45).double()
    assert stats["conv"].count == patches.shape[0]
    torch.testing.assert_close(stats["conv"].moment, patches.T @ patches, rtol=1e-5, atol=1e-4)  # float32 products
    h = F.relu(net.conv(x))
    rows = h.permute(0, 2, 3, 1).reshape(-1, 12).double()
    torch.testing.assert_close(stats["point"].moment, rows.T @ rows, rtol=1e-5, atol=1e-5)
    assert stats["hidden"].moment.shape == (160, 160) and stats["hidden"].count == 24


@pytest.mark.parametrize("spec", ["lower-conv-tucker{ranks=12x5,fit=activation,layers=conv}",
                                  "lower-conv-svd{ranks=12,fit=activation,layers=conv},lower-conv-svd{ranks=10,fit=activation,layers=point}",
                                  "lower-conv-svd{ranks=12,fit=activation,form=im2col,layers=conv}",
                                  "lower-linear-svd{ranks=24,fit=activation,layers=hidden},"
                                  "lower-linear-svd{ranks=8,fit=activation,layers=fc}"])
def test_every_data_aware_form_is_exact_at_full_rank(spec):
    net, gm, data = _run(f"calibrate{{batches=2}},{spec}")
    lowered = [r for r in state_of(gm).layers.values() if r.lowering]
    assert lowered and all(r.fit == "activation" and r.output_error < 1e-5 for r in lowered)
    x = data[0][0]
    torch.testing.assert_close(gm(x), net(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["lower-conv-tucker{ratio=3,layers=conv}", "lower-conv-svd{ratio=3,layers=conv}",
                                  "lower-linear-svd{ratio=3}"])
def test_fitting_to_the_inputs_beats_fitting_to_the_kernel_on_the_models_output(form):
    def divergence(fit):
        net, gm, data = _run(f"calibrate{{batches=4}},{form[:-1]},fit={fit}}}")
        x = torch.cat([b[0] for b in data])
        record = next(r for r in state_of(gm).layers.values() if r.lowering)
        with torch.no_grad():
            return float((gm(x) - net(x)).norm() / net(x).norm()), record

    (aware, record), (plain, kernel_record) = divergence("activation"), divergence("weight")
    assert aware < plain and record.fit == "activation" and kernel_record.fit == "weight"
    assert record.output_error < kernel_record.output_error  # measured on the same statistics


def test_fit_activation_without_calibrate_is_an_error_and_tiled_svd_has_no_data_aware_fit():
    with pytest.raises(SpecError, match="put calibrate before lower-conv-tucker"):
        _run("lower-conv-tucker{ratio=2,fit=activation,layers=conv}")
    with pytest.raises(SpecError, match="fit=activation applies to tucker and svd, not tiled-svd"):
        _run("calibrate,lower-conv-tiled-lowrank{ratio=2,tile=6x15,fit=activation,layers=conv}")


def test_inputs_that_are_all_zero_fall_back_to_the_kernel_fit_with_a_warning(caplog):
    zeros = [(torch.zeros(8, 5, 8, 8), torch.zeros(8, dtype=torch.long))]
    with caplog.at_level(logging.WARNING):
        _, gm, _ = _run("calibrate{batches=1},lower-conv-tucker{ratio=2,fit=activation,layers=conv}", zeros)
    record = state_of(gm).layers["conv"]
    assert record.lowering and record.fit.startswith("weight (its calibration inputs were all zero")
    assert "warning: layer conv: its calibration inputs were all zero" in caplog.text
    assert all(torch.isfinite(p).all() for p in gm.parameters())


def test_deeptwist_and_plan_latency_use_the_statistics(monkeypatch):
    _, gm, _ = _run("calibrate{batches=2},deeptwist{ratio=2,fit=activation,layers=conv}")
    projection = next(m for n, m in gm.named_modules() if n.endswith("_projection"))
    assert projection.stats is state_of(gm).calibration["conv"] and projection.plan.fit == "activation"
    from twistc.passes import plan_latency
    monkeypatch.setattr(plan_latency, "measure_layer", lambda shape, entries, *a, **k: [1.0] + [0.5] * (len(entries) - 1))
    monkeypatch.setattr(plan_latency.PlanLatency, "model_ms", lambda self, gm, runtime, cache: 10.0)
    monkeypatch.setattr(plan_latency.PlanLatency, "planned_ms", lambda self, gm, sites, options, picks, ms, *a: 9.0)
    _, gm, _ = _run("calibrate{batches=2},plan-latency{speedup=1.05,steps=3}")
    assert {e.fit for e in state_of(gm).plan.layers.values() if e.decomp != "none"} == {"activation"}



def test_calibrate_after_training_refreshes_the_projections_and_the_lowering_fits_the_new_inputs():
    """A hand-off that recalibrates: train without the final projection, calibrate on the trained network,
    lower; the final projection fits the new statistics, and the lowering is exact."""
    import copy

    from twistc.train import final_projection

    spec = ("calibrate{batches=2},deeptwist{decomp=natural,ratio=2,period=1000,fit=activation,layers=point},"
            "train{epochs=2,lr=0.1,finalize=false}")
    _, gm, data = _run(spec)
    projection = next(m for n, m in gm.named_modules() if n.endswith("_projection"))
    before = projection.stats
    assert projection.final_projections == 0 and before is state_of(gm).calibration["point"]
    gm = Pipeline.parse("calibrate{batches=2}").run(gm, RunContext(train_data=lambda: data, progress=False))
    assert projection.stats is state_of(gm).calibration["point"] and projection.stats is not before
    assert not torch.allclose(projection.stats.moment, before.moment)  # the trained conv feeds it other inputs
    x = data[0][0]
    refreshed, stale = copy.deepcopy(gm), copy.deepcopy(gm)
    next(m for n, m in stale.named_modules() if n.endswith("_projection")).stats = before
    final_projection(refreshed), final_projection(stale)
    expected = refreshed.eval()(x)
    assert not torch.allclose(stale.eval()(x), expected, atol=1e-4)
    lowered = Pipeline.parse("lower,cleanup").run(gm)
    torch.testing.assert_close(lowered.eval()(x), expected, atol=1e-4, rtol=1e-4)


def _calibrate_worker(rank, world, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        _, gm, _ = _run("calibrate{batches=4}")
        torch.save({k: (s.moment, s.count) for k, s in state_of(gm).calibration.items()}, f"{out}.{rank}")
    finally:
        leave()


@pytest.mark.slow
def test_calibration_statistics_are_the_same_under_one_and_two_processes(tmp_path):
    mp.spawn(_calibrate_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    _, gm, _ = _run("calibrate{batches=4}")
    single = state_of(gm).calibration
    for rank in range(2):
        ranks = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        for name, (moment, count) in ranks.items():
            assert count == single[name].count
            # float32 activations under other thread counts differ in their last digits; a lost or doubled
            # shard would differ by a factor
            torch.testing.assert_close(moment, single[name].moment, rtol=1e-4, atol=1e-4)
