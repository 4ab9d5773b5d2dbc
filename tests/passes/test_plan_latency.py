"""plan-latency with an injected latency table (no timing), then with real timing on a small model."""
import itertools
import json
import random
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import twistc.passes.plan_latency as plan_latency
from twistc import Pipeline, RunContext, state_of, trace
from twistc.errors import RankError, SpecError
from twistc.decomp.cost import ConvGeometry
from twistc.latency import Runtime, measure_layer
from twistc.latency_cache import LatencyCache
from twistc.passes.plan_latency import Option, PlanLatency
from twistc.plan import LayerPlan
from twistc.evaluation import accuracy
from twistc.train import train


def _net():
    torch.manual_seed(0)
    # 5 input channels: the first conv is no stem (a stem keeps all it reads), so it has candidates
    return nn.Sequential(nn.Conv2d(5, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def _traced():
    return trace(_net(), (torch.randn(1, 5, 8, 8),))


@pytest.fixture
def table(monkeypatch):
    """Latency = a function of the candidate; the whole model = 1.0 ms outside its layers + the dense layers."""
    rules = {"dense": lambda e, shape: 1.0}

    def fake_measure(shape, entries, runtime, cache, warmup=5, reps=25, dtype=torch.float32):
        rules.setdefault("dtypes", []).append(dtype)
        return [rules["dense"](None, shape) if e is None else rules["lowered"](e, shape) for e in entries]

    def fake_model_ms(self, gm, runtime, cache):
        return 1.0 + sum(rules["dense"](None, s.geometry) for s in plan_latency.conv_sites(gm))

    def fake_planned_ms(self, gm, sites, options, picks, model_ms, *rest):  # the model saves what its layers do
        return model_ms - sum(o[0][1] - o[i][1] for o, i in zip(options, picks)) * rules.get("realised", 1.0)

    monkeypatch.setattr(plan_latency, "measure_layer", fake_measure)
    monkeypatch.setattr(PlanLatency, "model_ms", fake_model_ms)
    monkeypatch.setattr(PlanLatency, "planned_ms", fake_planned_ms)
    return rules


def _run(spec, gm=None):
    gm = gm or _traced()
    return Pipeline.parse(spec).run(gm), gm


def test_layers_whose_candidates_are_all_slower_stay_dense(table, tmp_path):
    table["lowered"] = lambda e, shape: 1.5 if shape.in_channels == 5 else 0.1
    gm, _ = _run(f"plan-latency{{speedup=1.3,cache={tmp_path / 'c.json'}}}")
    plan = state_of(gm).plan
    assert plan.get("0").decomp == "none" and plan.get("2").decomp != "none"
    table["lowered"] = lambda e, shape: 1.5
    with pytest.raises(RankError, match="speedup 1.3 is out of reach.*the fastest candidates give 1.00x"):
        _run(f"plan-latency{{speedup=1.3,cache={tmp_path / 'c.json'}}}")
    with pytest.raises(RankError, match="ratio 1.5 is out of reach with candidates that are not slower"):
        _run(f"plan-latency{{ratio=1.5,cache={tmp_path / 'c.json'}}}")


def test_the_report_says_why_the_plan_left_a_layer_dense(table, tmp_path):
    # only the 16->32 3x3 conv has forms faster than dense; every other candidate is slower
    table["lowered"] = lambda e, shape: 0.1 if shape.in_channels == 16 else 1.5
    gm, _ = _run(f"plan-latency{{speedup=1.01,layers=0|2|4,cache={tmp_path / 'c.json'}}},"
                 "lower,cleanup")
    layers = state_of(gm).layers
    assert layers["2"].lowering and layers["2"].skip_reason is None
    # the later lowering passes (1x1 conv under Tucker, Linear under the conv passes) keep the plan's reason
    assert layers["0"].skip_reason == layers["4"].skip_reason == "left dense by the plan: no form ran faster"
    assert layers["7"].skip_reason == "left dense by the plan: not selected by layers=0|2|4"
    table["lowered"] = lambda e, shape: 0.1
    gm, _ = _run(f"plan-latency{{speedup=1.01,cache={tmp_path / 'c.json'}}},lower-conv-tucker,lower-conv-svd")
    dense = {n: r.skip_reason for n, r in state_of(gm).layers.items() if not r.lowering}
    assert dense.pop("7") == ("left dense by the plan: the model's head: it keeps a rank per output (4), and no "
                              "smaller form keeps them")
    assert dense and set(dense.values()) == {"left dense by the plan: target met without it"}


def test_meets_a_reachable_target_with_the_least_error(table, tmp_path):
    # each lowered form costs 0.1 ms per rank unit (sum of ranks / 8): lower ranks are faster
    table["lowered"] = lambda e, shape: 0.1 * sum(e.ranks) / 8
    gm, _ = _run(f"plan-latency{{speedup=1.5,cache={tmp_path / 'c.json'}}},"
                 "lower,cleanup")
    state = state_of(gm)
    latency = state.latency
    assert latency["model_ms_before"] == 5.0 and latency["predicted_ms_after"] <= 5.0 / 1.5 + 1e-9
    chosen = [r for r in state.layers.values() if r.lowering]
    assert chosen and all(r.latency_after < r.latency_before for r in chosen)
    # the 1x1 conv can only take an SVD pair; the 3x3s take whichever form errs less for the time
    assert state.plan.get("4").decomp in ("svd", "none")
    # the least error: no other single pick of a candidate per layer meets the target with less squared error
    total = sum(r.approx_error ** 2 for r in state.layers.values() if r.approx_error is not None)
    for speedup in (1.2, 1.5, 2.0):
        other, _ = _run(f"plan-latency{{speedup={speedup},cache={tmp_path / 'c.json'}}}")
        errs = sum(r.approx_error ** 2 for r in state_of(other).layers.values() if r.approx_error is not None)
        assert (errs <= total + 1e-12) == (speedup <= 1.5)


def test_prediction_subtracts_savings_when_layers_alone_cost_more_than_in_the_model(table, tmp_path, monkeypatch):
    # the three convs timed alone take 3 ms, the whole model 2 ms: alone, each pays a cost the model hides
    monkeypatch.setattr(PlanLatency, "model_ms", lambda self, gm, runtime, cache: 2.0)
    table["lowered"] = lambda e, shape: 0.1 * sum(e.ranks) / 8
    gm, _ = _run(f"plan-latency{{speedup=1.5,cache={tmp_path / 'c.json'}}}")
    state = state_of(gm)
    saved = sum(r.latency_before - r.latency_after for r in state.layers.values() if r.latency_before is not None)
    assert state.latency["predicted_ms_after"] == pytest.approx(2.0 - saved)
    assert state.latency["predicted_ms_after"] <= 2.0 / 1.5


def test_equal_latency_prefers_the_lower_error(table, tmp_path):
    table["lowered"] = lambda e, shape: 0.2  # every candidate equally fast
    gm, _ = _run(f"plan-latency{{speedup=1.3,cache={tmp_path / 'c.json'}}}")
    for name, entry in state_of(gm).plan.layers.items():
        if entry.decomp != "none":  # the largest ranks of the grid err least
            candidates = PlanLatency(speedup=1.3).candidates(gm, next(
                s for s in plan_latency.conv_sites(gm) if s.name == name))
            errors = PlanLatency.errors(gm, next(s for s in plan_latency.conv_sites(gm) if s.name == name), candidates)
            assert state_of(gm).layers[name].approx_error == pytest.approx(min(errors))


def test_the_plan_is_consumed_unchanged_by_deeptwist_and_the_lowerings(table, tmp_path):
    table["lowered"] = lambda e, shape: 0.1 * sum(e.ranks) / 8
    gm, _ = _run(f"plan-latency{{speedup=1.5,cache={tmp_path / 'c.json'}}},deeptwist{{period=2}}")
    state = state_of(gm)
    planned = {n: e for n, e in state.plan.layers.items()}
    projections = {p.layer: p.plan for p in gm.modules() if type(p).__name__ == "LowRankProjection"}
    assert projections == {n: e for n, e in planned.items() if e.decomp != "none"}
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 5, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]
    train(gm, lambda: data, 1, progress=False)
    x = torch.randn(2, 5, 8, 8)
    expected = gm(x)
    gm = Pipeline.parse("lower-conv-tucker,lower-conv-svd,lower-linear-svd,cleanup").run(gm)
    torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=1e-5)
    for name, entry in planned.items():
        assert state.layers[name].lowering == (entry.lowering if entry.decomp != "none" else None)
        assert state.plan.get(name) == entry


def test_ranks_are_multiples_of_8_on_cuda_unless_told_otherwise():
    gm = _traced()
    site = next(s for s in plan_latency.conv_sites(gm) if s.name == "2")  # 16 -> 32 channels, 3x3
    on_gpu = PlanLatency(speedup=2, device="cuda").candidates(gm, site)
    assert on_gpu and all(r % 8 == 0 for e in on_gpu for r in e.ranks)
    on_cpu = PlanLatency(speedup=2).candidates(gm, site)
    assert any(r % 8 for e in on_cpu for r in e.ranks)
    assert PlanLatency(speedup=2, device="cuda", round_to=1).candidates(gm, site) == on_cpu


@pytest.mark.parametrize("spec, message", [
    ("plan-latency", "exactly one of"),
    ("plan-latency{speedup=2,ratio=2}", "exactly one of"),
    ("plan-latency{speedup=1}", "> 1"),
    ("plan-latency{ratio=inf}", "finite"),
    ("plan-latency{speedup=2,forms=cp}", "forms must be one of"),
    ("plan-latency{speedup=2,steps=1}", "steps must be >= 2"),
    ("plan-latency{speedup=2,runtime=tvm}", "runtime must be one of"),
    ("plan-latency{speedup=2,threads=0}", "threads and batch"),
])
def test_bad_options(spec, message):
    with pytest.raises(SpecError, match=message):
        Pipeline.parse(spec)


def test_cache_round_trips_and_is_keyed_by_runtime_shape_and_candidate(tmp_path, monkeypatch):
    calls = []
    real = plan_latency.measure_layer.__globals__["paired_medians"]
    monkeypatch.setitem(plan_latency.measure_layer.__globals__, "paired_medians",
                        lambda timers, *a, **k: calls.append(len(timers)) or real(timers, 1, 3))
    shape = ConvGeometry(8, 4, (3, 3), in_hw=(6, 6), padding=(1, 1))
    entries = [None, LayerPlan("tucker", (2, 2), "tucker-chain"), LayerPlan("svd", (3,), "svd-conv",
                                                                            order="channel-major")]
    path = tmp_path / "cache.json"
    cache = LatencyCache(path)
    first = measure_layer(shape, entries, Runtime(), cache)
    cache.save()
    assert calls == [4] and all(ms > 0 for ms in first)  # an identity for the per-call cost, then dense + 2
    again = measure_layer(shape, entries, Runtime(), LatencyCache(path))
    assert again == first and calls == [4]  # nothing measured the second time
    keys = json.loads(path.read_text())["entries"]
    assert len(keys) == 3 and all("threads=1|batch=1" in k and "conv=8x4x3x3,in=4x6x6" in k for k in keys)
    measure_layer(shape, entries[:2], Runtime(threads=2), LatencyCache(path))
    measure_layer(ConvGeometry(8, 4, (3, 3), in_hw=(7, 7), padding=(1, 1)), entries[:2], Runtime(), LatencyCache(path))
    assert calls == [4, 3, 3]  # another thread count or input shape is measured anew
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(SpecError, match="is a folder"):
        LatencyCache(folder)


class _TwoPaths(nn.Module):
    """`a`'s output is multiplied by zero, so approximating it costs no accuracy; `b` decides the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # 5 input channels: neither is a stem, whose input stays whole
        self.a, self.b = nn.Conv2d(5, 16, 3, padding=1), nn.Conv2d(5, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head((self.a(x) * 0.0 + self.b(x)).mean((2, 3)))


def test_objective_eval_spends_the_budget_where_the_output_does_not_move(table, tmp_path, caplog):
    table["dense"] = lambda e, shape: 1.0
    table["lowered"] = lambda e, shape: 0.5
    net = _TwoPaths().eval()
    x = torch.randn(64, 5, 8, 8, generator=torch.Generator().manual_seed(2))
    data = [(x[:32], net(x[:32]).argmax(1)), (x[32:], net(x[32:]).argmax(1))]  # 100% accurate before
    gm = trace(net, (x[:1],))
    ctx = RunContext(eval_data=lambda: data)
    gm = Pipeline.parse(f"plan-latency{{speedup=1.14,objective=eval,cache={tmp_path / 'c.json'}}}").run(gm, ctx)
    state = state_of(gm)
    assert state.plan.get("a").decomp != "none" and state.layers["a"].accuracy_drop == 0.0
    assert state.plan.get("b").decomp == state.plan.get("head").decomp == "none"  # a alone saves enough
    assert "sensitivities were measured on 64 samples" in caplog.text  # few: a warning
    with pytest.raises(SpecError, match="needs eval_data"):
        Pipeline.parse(f"plan-latency{{speedup=1.14,objective=eval,cache={tmp_path / 'c.json'}}}").run(
            trace(_TwoPaths(), (x[:1],)))


def _two_paths_and_data(seed=0):
    net = _TwoPaths().eval()
    x = torch.randn(256, 5, 8, 8, generator=torch.Generator().manual_seed(seed))
    data = [(x[i:i + 64], net(x[i:i + 64]).argmax(1)) for i in range(0, 256, 64)]  # 100% accurate before
    return net, data


@pytest.mark.parametrize("max_drop", [0.01, 0.05, 0.99])
def test_max_drop_gives_the_fastest_plan_whose_measured_drop_is_within_it(table, tmp_path, max_drop, caplog):
    table["lowered"] = lambda e, shape: 0.1 * sum(e.ranks) / 8  # lower ranks are faster
    net, data = _two_paths_and_data()
    gm = trace(net, (data[0][0][:1],))
    spec = f"plan-latency{{max_drop={max_drop},eval_batches=4,cache={tmp_path / 'c.json'}}}"
    gm = Pipeline.parse(spec).run(gm, RunContext(eval_data=lambda: data))
    state = state_of(gm)
    drop = state.latency["accuracy_drop"]
    assert drop["max"] == max_drop and drop["samples"] == 256
    assert "max_drop was measured on 256 samples" in caplog.text  # too few to trust: a warning
    sites = {s.name: s for s in plan_latency.conv_sites(gm)}
    chosen = [(s, state.plan.get(name)) for name, s in sites.items() if state.plan.get(name).decomp != "none"]
    with plan_latency.approximated(gm, chosen):  # the whole plan at once, measured independently
        assert 1 - accuracy(gm, data) == pytest.approx(drop["measured"]) and drop["measured"] <= max_drop
    offered = {name: PlanLatency(speedup=2).candidates(gm, s) for name, s in sites.items()}
    fastest = {name: min(sum(e.ranks) for e in entries) for name, entries in offered.items() if entries}
    assert all(state.plan.get(name).decomp == "none" for name in set(sites) - set(fastest))  # its head
    assert sum(state.plan.get("a").ranks) == fastest["a"]  # costs no accuracy: always at its fastest
    if max_drop == 0.99:  # anything goes: every layer at its fastest
        assert all(sum(state.plan.get(name).ranks) == ms for name, ms in fastest.items())
    else:
        assert state.plan.get("b").decomp == "none"  # every form of b alone loses more than max_drop


def test_each_candidates_cost_is_what_the_whole_model_gives_with_that_layer_approximated():
    net, data = _two_paths_and_data()
    gm = trace(net, (data[0][0][:1],))
    baseline = (accuracy(gm, data), plan_latency.scores(gm, data))
    for site in plan_latency.conv_sites(gm)[:2]:  # a and b (the 4-class head has no candidates)
        entries = PlanLatency(speedup=2).candidates(gm, site)
        before = site.weight(gm).detach().clone()
        costs = plan_latency.alone_costs(gm, site, entries, data, baseline)
        assert torch.equal(site.weight(gm), before)  # restored
        assert entries and (site.name != "b" or max(d for d, _ in costs) > 0)  # b's candidates do cost accuracy
        for entry, (drop, kl) in zip(entries, costs):
            with plan_latency.approximated(gm, [(site, entry)]):  # the whole model, run as usual
                approx = plan_latency.scores(gm, data)
                assert drop == pytest.approx(max(baseline[0] - accuracy(gm, data), 0.0), abs=1e-12)
            divergence = sum(float(torch.nn.functional.kl_div(s.log_softmax(1), d.log_softmax(1), log_target=True,
                                                              reduction="sum")) for s, d in zip(approx, baseline[1]))
            assert kl == pytest.approx(divergence / 256, rel=1e-5, abs=1e-9)


def test_max_drop_search_finds_the_fastest_plan_that_fits(monkeypatch):
    """Layers whose drops add up exactly as their divergences: the search must find what brute force finds,
    also where the fastest plan does not fit and the free candidates alone are far from the best."""
    active = []

    @contextmanager
    def fake_approximated(gm, layers):
        active[:] = [entry for _, entry in layers]
        yield

    monkeypatch.setattr(plan_latency, "approximated", fake_approximated)
    monkeypatch.setattr(plan_latency, "accuracy", lambda gm, batches: 1.0 - sum(e.ranks[0] / 1000 for e in active))
    rng = random.Random(0)
    for trial in range(20):
        # per layer: dense (1 ms), then candidates entry(ranks=(kl in thousandths,)) that run faster
        options = [[Option(None, 1.0, 0.0, 0.0, 0.0)] + [
            Option(LayerPlan("svd", (k,), "svd-conv"), 1.0 - rng.uniform(0.05, 0.9), 0.0, k / 1000, k / 1000)
            for k in rng.sample(range(0, 40), 3)] for _ in range(4)]
        pass_ = PlanLatency(max_drop=0.05)
        picks, drop = pass_.fastest_within_drop(None, [None] * 4, options, [], 1.0)
        latency = lambda ps: sum(o[i][1] for o, i in zip(options, ps))  # noqa: E731
        feasible = [ps for ps in itertools.product(*(range(len(o)) for o in options))
                    if sum(o[i][4] for o, i in zip(options, ps)) <= 0.05 + 1e-12]
        assert drop <= 0.05 + 1e-12 and drop == pytest.approx(sum(o[i][4] for o, i in zip(options, picks)))
        assert latency(picks) == pytest.approx(min(latency(ps) for ps in feasible)), trial


def test_max_drop_out_of_reach_and_bad_values(table, tmp_path):
    table["lowered"] = lambda e, shape: 0.5 if sum(e.ranks) <= 4 else 1.5  # only the lowest ranks are faster
    net, data = _two_paths_and_data()
    gm = trace(net, (data[0][0][:1],))
    with pytest.raises(RankError, match=r"max_drop 0.001 is out of reach: every plan tried lost more on the 256 "
                                        r"samples .*the least any one candidate loses alone is"):
        Pipeline.parse(f"plan-latency{{max_drop=0.001,layers=b,eval_batches=4,cache={tmp_path / 'c.json'}}}").run(
            gm, RunContext(eval_data=lambda: data))
    for spec, message in [("max_drop=0", "max_drop is a fraction of accuracy in"),
                          ("max_drop=1.5", "max_drop is a fraction of accuracy in"),
                          ("max_drop=0.01,objective=eval", "leave out objective"),
                          ("max_drop=0.01,speedup=2", "exactly one of")]:
        with pytest.raises(SpecError, match=message):
            Pipeline.parse(f"plan-latency{{{spec}}}")
    with pytest.raises(SpecError, match=r"plan-latency\{max_drop\} needs eval_data"):
        Pipeline.parse("plan-latency{max_drop=0.01}").run(trace(_TwoPaths(), (data[0][0][:1],)))


def test_the_whole_model_time_is_cached_so_the_same_command_plans_the_same(tmp_path, monkeypatch):
    medians = iter([3.0, 5.0, 7.0])
    monkeypatch.setattr(plan_latency, "paired_medians", lambda timers, reps, samples: [next(medians)])
    cache = LatencyCache(tmp_path / "c.json")
    runtime = Runtime("ort", "cpu", 1, 1)
    pass_ = PlanLatency(speedup=1.2)
    assert pass_.model_ms(_traced(), runtime, cache) == pass_.model_ms(_traced(), runtime, cache) == 3.0
    wider = trace(nn.Sequential(nn.Conv2d(5, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, padding=1)),
                  (torch.randn(1, 5, 8, 8),))
    assert pass_.model_ms(wider, runtime, cache) == 5.0  # another structure is timed anew
    assert pass_.model_ms(trace(_net(), (torch.randn(1, 5, 16, 16),)), runtime, cache) == 7.0  # another input


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(5, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x, scale):
        return self.b(torch.relu(self.a(x))) * scale


def test_a_model_with_several_inputs_is_timed_whole_on_all_of_them(tmp_path, monkeypatch):
    # the layers' times are injected (lowered forms faster); the whole model is timed for real
    monkeypatch.setattr(plan_latency, "measure_layer", lambda shape, entries, *a, **k: [
        1.0 if e is None else 0.1 for e in entries])
    gm = trace(TwoInputs().eval(), (torch.randn(1, 5, 8, 8), torch.ones(1, 1, 1, 1)))
    gm = Pipeline.parse(f"plan-latency{{macs=1.2,reps=3,cache={tmp_path / 'c.json'}}},lower-conv-tucker,"
                        "lower-conv-svd").run(gm)
    assert state_of(gm).latency["model_ms_before"] > 0 and any(r.lowering for r in state_of(gm).layers.values())


def test_runtime_torch_measures_in_pytorch_and_leaves_threads_alone(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(5, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4)).eval()
    threads = torch.get_num_threads()
    gm = Pipeline.parse(f"plan-latency{{ratio=1.5,runtime=torch,steps=4,reps=3,cache={tmp_path / 'c.json'}}}").run(
        trace(net, (torch.randn(1, 5, 24, 24),)))
    state = state_of(gm)
    assert state.latency["runtime"]["runtime"] == "torch" and torch.get_num_threads() == threads
    keys = json.loads((tmp_path / "c.json").read_text())["entries"]
    assert keys and all(k.startswith(f"torch-{torch.__version__}|cpu|") for k in keys)
    assert state.plan.get("2").decomp != "none"  # the wide conv is where 1.5x fewer weights come cheapest


def test_channels_last_times_nhwc_weights_and_inputs_and_keys_them_apart(tmp_path, monkeypatch):
    seen = []
    conv = nn.Conv2d(8, 16, 3, padding=1)
    original = nn.Conv2d.forward
    monkeypatch.setattr(nn.Conv2d, "forward", lambda self, x: seen.append(
        (x.is_contiguous(memory_format=torch.channels_last), self.weight.is_contiguous(memory_format=torch.channels_last))
        ) or original(self, x))
    runtime = Runtime("torch", "cpu", channels_last=True)
    assert runtime.timer(conv, torch.randn(2, 8, 10, 10))() > 0 and seen[-1] == (True, True)
    assert conv.weight.is_contiguous()  # the caller's module is left as it was
    assert runtime.key().endswith("|channels_last") and not Runtime("torch", "cpu").key().endswith("channels_last")
    with pytest.raises(SpecError, match="channels_last applies to runtime torch"):
        Runtime("ort", "cpu", channels_last=True)
    monkeypatch.setattr(plan_latency, "measure_layer", lambda shape, entries, *a, **k: [1.0 - 0.1 * i for i in
                                                                                        range(len(entries))])
    monkeypatch.setattr(PlanLatency, "model_ms", lambda self, gm, runtime, cache: 10.0)
    gm = Pipeline.parse(f"plan-latency{{ratio=1.5,runtime=torch,channels_last=true,steps=3,reps=2,"
                        f"cache={tmp_path / 'c.json'}}}").run(_traced())
    assert state_of(gm).latency["runtime"]["channels_last"] is True

def test_runtime_torch_compile_times_compiled_candidates(tmp_path):
    entries = [None, LayerPlan("svd", (4,), "svd-conv", order="channel-major")]
    cache = LatencyCache(tmp_path / "c.json")
    ms = measure_layer(ConvGeometry(16, 8, (3, 3), in_hw=(10, 10), padding=(1, 1)), entries,
                       Runtime("torch-compile"), cache, reps=3)
    assert len(ms) == 2 and all(m > 0 for m in ms)
    cache.save()
    keys = json.loads((tmp_path / "c.json").read_text())["entries"]
    assert len(keys) == 2 and all(k.startswith(f"torch-compile-{torch.__version__}|cpu|") for k in keys)


class _Sequence(nn.Module):
    """A Conv1d over a sequence, then Linear layers over its positions."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(8, 48, 3, padding=1)
        self.mix = nn.Linear(48, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mix(torch.relu(self.conv(x)).transpose(1, 2))).mean(1))


def test_conv1d_and_linear_layers_are_timed_planned_and_lowered_as_planned(table, tmp_path):
    cache = LatencyCache(tmp_path / "real.json")
    conv1d = ConvGeometry(48, 8, (3, 1), in_hw=(32, 1), padding=(1, 0), kind="Conv1d")
    linear = ConvGeometry(64, 48, (1, 1), in_hw=(32, 1), kind="Linear")
    for shape, entry in ((conv1d, LayerPlan("tucker", (8, 4), "tucker-chain")),
                         (conv1d, LayerPlan("svd", (8,), "svd-conv", order="channel-major")),
                         (linear, LayerPlan("svd", (8,), "svd-linear"))):
        assert all(ms > 0 for ms in measure_layer(shape, [None, entry], Runtime(), cache, reps=2))
    keys = list(cache.entries)
    assert any("kind=Conv1d" in k and "tucker-chain" in k for k in keys)
    assert any("linear=64x48,tokens=32" in k and "svd-linear" in k for k in keys)

    table["lowered"] = lambda e, shape: 0.1 * sum(e.ranks) / 8
    gm = Pipeline.parse(f"plan-latency{{speedup=1.5,cache={tmp_path / 'c.json'}}}").run(
        trace(_Sequence().eval(), (torch.randn(1, 8, 32),)))
    state = state_of(gm)
    planned = {n: e for n, e in state.plan.layers.items() if e.decomp != "none"}
    assert set(state.plan.layers) == {"conv", "mix", "head"}
    assert {e.lowering for e in planned.values()} >= {"svd-linear"} and "conv" in planned
    gm = Pipeline.parse("lower,cleanup").run(gm)
    for name, entry in planned.items():
        assert state.layers[name].lowering == entry.lowering and state.plan.get(name) == entry


def test_cp_chains_are_timed_and_planned_when_asked_for(table, tmp_path):
    cache = LatencyCache(tmp_path / "c.json")
    shape = ConvGeometry(32, 16, (3, 3), in_hw=(12, 12), padding=(1, 1))
    ms = measure_layer(shape, [None, LayerPlan("cp", (8,), "cp-chain")], Runtime(), cache, reps=3)  # the real one
    assert len(ms) == 2 and all(m > 0 for m in ms)
    table["lowered"] = lambda e, shape: 0.1 * sum(e.ranks) / 8
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, 4)).eval()
    gm = Pipeline.parse(f"plan-latency{{speedup=1.2,forms=cp-chain,steps=3,cache={tmp_path / 'c.json'}}},"
                        "lower-conv-cp,cleanup").run(
        trace(net, (torch.randn(1, 16, 12, 12),)))
    entry = state_of(gm).plan.get("0")
    assert entry.lowering == "cp-chain" and state_of(gm).layers["0"].lowering == "cp-chain"


def test_candidates_are_timed_in_the_model_dtype(table, tmp_path, monkeypatch):
    cache = LatencyCache(tmp_path / "real.json")
    entries = [None, LayerPlan("tucker", (8, 4), "tucker-chain")]
    for dtype, runtime in (("float16", Runtime()), ("bfloat16", Runtime()), ("bfloat16", Runtime("torch"))):
        shape = ConvGeometry(16, 8, (3, 3), in_hw=(10, 10), padding=(1, 1))
        assert all(ms > 0 for ms in measure_layer(shape, entries, runtime, cache, reps=2, dtype=getattr(torch, dtype)))
    assert sum(f"dtype={d}" in k for k in cache.entries for d in ("float16", "bfloat16")) == 6

    table["lowered"] = lambda e, shape: 0.1 * sum(e.ranks) / 8
    monkeypatch.setattr(PlanLatency, "model_ms", lambda self, gm, runtime, cache: 4.0)
    gm = trace(_net().to(torch.float16), (torch.randn(1, 5, 8, 8, dtype=torch.float16),))
    Pipeline.parse(f"plan-latency{{speedup=1.5,cache={tmp_path / 'c.json'}}}").run(gm)
    assert table["dtypes"] and set(table["dtypes"]) == {torch.float16}


def test_a_plan_the_model_times_short_of_the_target_is_planned_again_for_the_shortfall(table, tmp_path):
    table["lowered"] = lambda e, shape: 0.1 * sum(e.ranks) / 8  # lower ranks are faster
    table["realised"] = 0.6  # inside the model, the layers save only 60% of what they save alone
    spec = f"plan-latency{{speedup=1.3,cache={tmp_path / 'c.json'}}},lower"
    gm, _ = _run(spec)
    latency = state_of(gm).latency
    rounds = latency["plan_timed"]
    assert len(rounds) >= 2 and rounds[1]["asked_speedup"] > 1.3  # planned again for a larger saving
    assert latency["model_ms_before"] / latency["predicted_ms_after"] >= 0.95 * 1.3  # the timed plan meets it
    assert latency["predicted_ms_after"] == rounds[-1]["measured_ms"]


def test_a_plan_still_short_when_timed_whole_is_refused_with_what_it_reached(table, tmp_path):
    table["lowered"] = lambda e, shape: 0.1 * sum(e.ranks) / 8
    table["realised"] = 0.25  # inside the model the layers keep a quarter of their saving: re-planning cannot make up
    spec = f"plan-latency{{speedup=1.3,cache={tmp_path / 'c.json'}}},lower"
    with pytest.raises(RankError, match=r"speedup 1.3 is out of reach in ort/cpu: the best plan, lowered and timed "
                                        r"whole \(\d rounds?\), gives 1\.\d\dx; .*% of the model's time is outside"):
        _run(spec)

def test_a_refused_speedup_shows_the_digits_that_make_it_short():
    assert plan_latency.short_of(1.4968, 1.5) == "1.497x" and plan_latency.short_of(1.36, 1.5) == "1.36x"
    assert plan_latency.short_of(1.49996, 1.5) == "1.49996x" and plan_latency.at_most(1.4968) == "1.49x"


def test_a_plan_that_times_slower_than_dense_whole_is_refused(table, tmp_path):
    table["lowered"] = lambda e, shape: 0.1 * sum(e.ranks) / 8
    table["realised"] = -0.2  # inside the model, the lowered layers cost more than the dense ones
    spec = f"plan-latency{{speedup=1.3,cache={tmp_path / 'c.json'}}},lower"
    with pytest.raises(RankError, match=r"speedup 1.3 is out of reach in ort/cpu: its plan, lowered and timed whole, "
                                        r"ran at 0\.\d\dx of the dense model \(its layers timed alone promised"):
        _run(spec)

class _Depthwise(nn.Module):
    """A 1x1 conv that compresses, then a depthwise conv that no form can."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.point = nn.Conv2d(16, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)

    def forward(self, x):
        return self.depthwise(torch.relu(self.point(x)))


def test_a_refusal_names_the_share_of_time_no_form_can_reduce(table, tmp_path):
    table["lowered"] = lambda e, shape: 0.5  # any form halves the 1x1 conv
    # the model: 1 ms outside the layers + 1 ms per layer = 3 ms, of which only the 1x1 conv's 1 ms shrinks
    gm = trace(_Depthwise().eval(), (torch.randn(1, 16, 8, 8),))
    with pytest.raises(RankError, match=r"67% of the model's time is outside the layers some form makes faster "
                                        r"\(1 layer no form speeds up: depthwise, and the operations between layers\)"
                                        r", so even compressed layers that took no time would give at most 1.50x"):
        Pipeline.parse(f"plan-latency{{speedup=2,cache={tmp_path / 'c.json'}}},lower-conv-svd").run(gm)


def test_timings_taken_on_a_busy_machine_are_flagged(tmp_path, caplog):
    from twistc.timing import Sampling
    cache = LatencyCache(tmp_path / "c.json")
    cache.put("quiet", 1.0, Sampling(load=0.5, cores=2, threads=1))
    assert PlanLatency.busy_timings(cache) == {}
    cache.put("busy", 1.0, Sampling(load=5.0, cores=2, threads=1))  # another job on every core
    flagged = PlanLatency.busy_timings(cache)
    assert flagged["trustworthy"] is False and "load average 5.0 on 2 core(s)" in flagged["problems"][0]
    assert "plan-latency timed 1 of 2 candidates and models on a busy machine" in caplog.text
