import pytest
import torch
from dataclasses import dataclass

import twistc
from twistc import pipeline
from twistc.errors import PassError, SpecError
from twistc.commands import preset_items
from twistc.pipeline import Pass, PassResult, Pipeline
from twistc.passes.deeptwist import DeepTwist
from twistc.passes.train import Train
from models_for_tests import Net


@pytest.mark.parametrize("spec", [
    "deeptwist{decomp=tucker,ratio=4,period=200},train{epochs=3},lower-conv-tucker,cleanup",
    "train{epochs=3,lr=0.05}",
    "lower-conv-tucker{ranks=8x4,layers=layer1.*|conv1},cleanup",
    "deeptwist{ratio=2.5,round_to=8}",
])
def test_spec_parses_and_prints_back(spec):
    p = Pipeline.parse(spec)
    assert str(p) == spec
    assert str(Pipeline.parse(str(p))) == spec


def test_options_are_typed():
    p = Pipeline.parse("deeptwist{decomp=tucker,ratio=4,period=200},train{epochs=3,lr=0.05},lower-conv-tucker{ranks=8x4}")
    dt, tr, low = p.stages
    assert isinstance(dt, DeepTwist) and dt.ratio == 4.0 and dt.period == 200
    assert isinstance(tr, Train) and tr.epochs == 3 and tr.lr == 0.05
    assert low.ranks == (8, 4)


def preset_pipeline(*args, **kwargs) -> str:
    return ",".join(item.spec() for item in preset_items(*args, **kwargs))


def test_presets_expand():
    assert preset_pipeline("deeptwist-tucker") == "deeptwist{decomp=natural},train,lower,fold,cleanup"
    assert preset_pipeline("tucker") == "lower,fold,cleanup"
    assert preset_pipeline("tucker", epochs=2) == "lower,train,fold,cleanup"
    assert preset_pipeline("deeptwist-tucker", latency_target={"max_drop": 0.01}) == (
        "plan-latency{max_drop=0.01},deeptwist{decomp=natural},train,lower,fold,cleanup")
    with pytest.raises(SpecError, match=r"--max-drop applies to the presets.*write plan-latency\{max_drop=...\}"):
        preset_pipeline("lower-conv-svd", latency_target={"max_drop": 0.01})
    assert [s.name for s in Pipeline.parse("deeptwist-tucker").stages] == [
        "deeptwist", "train", "lower", "fold", "cleanup"]
    names = [row[0] for row in pipeline.describe()]
    assert {"deeptwist", "lower", "lower-conv-tucker", "cleanup", "train", "tucker", "deeptwist-tucker"} <= set(names)


@pytest.mark.parametrize("spec,message", [
    ("lower-conv-block-term", "unknown pass 'lower-conv-block-term'"),
    ("deeptwist{speed=3}", "has no option 'speed'"),
    ("deeptwist{period=fast}", "cannot read 'fast' as int"),
    ("deeptwist{period}", "not key=value"),
    ("train{epochs=3", "unbalanced"),
    ("", "empty"),
    ("lower-conv-tucker{ratio=0.5}", "ratio must be a finite number > 1"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(twistc.TwistcError, match=message):
        Pipeline.parse(spec)


def test_defaults_fill_only_unwritten_options_the_stage_takes():
    values = {"ratio": 2.0, "period": 50, "epochs": 9, "tile": None, "layers": "conv1"}
    stage = pipeline.parse_item("deeptwist{ratio=4}").with_defaults(values).stage()
    assert stage.ratio == 4.0 and stage.period == 50 and stage.spec() == "deeptwist{ratio=4,period=50}"
    assert pipeline.parse_item("deeptwist{ranks=3x2}").with_defaults(values).stage().ratio is None  # exclusive
    assert pipeline.parse_item("deeptwist").with_defaults(values, also=["layers"]).stage().layers == "conv1"
    assert pipeline.parse_item("fold").with_defaults(values).spec() == "fold"
    # an item is checked as a stage once filled: plan-latency's target may come from the run's ratio
    assert pipeline.parse_item("plan-latency").with_defaults(values).stage().ratio == 2.0


def test_every_stage_registers_itself_and_declares_the_run_settings_it_takes():
    import dataclasses

    registry = pipeline.registry()
    assert {"calibrate", "plan-latency", "deeptwist", "lower", "lower-conv-tucker", "fold", "cleanup",
            "train"} <= set(registry)
    for name, cls in registry.items():
        assert cls.name == name and set(cls.run_defaults) <= {f.name for f in dataclasses.fields(cls)}, name
    assert "device" not in registry["plan-latency"].run_defaults  # it measures where its own device= says
    with pytest.raises(TypeError, match="two stages are named 'fold'"):
        pipeline.register(type("Fold2", (Pass,), {"name": "fold", "summary": ""}))


def test_presets_are_typed_items_and_each_pipeline_gets_its_own_stages():
    presets = pipeline.presets()
    assert all(issubclass(item.cls, pipeline.Stage) for preset in presets.values() for item in preset.items)
    assert str(presets["tucker"]) == "lower[,train],fold,cleanup"
    first, second = Pipeline.parse("deeptwist-tucker"), Pipeline.parse("deeptwist-tucker")
    assert all(a is not b for a, b in zip(first.stages, second.stages))


@dataclass(frozen=True)
class BreakShapes(Pass):
    name = "break-shapes"
    summary = "test pass that corrupts the graph"

    def __call__(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            flat = gm.graph.call_function(torch.flatten, (out.args[0],))
        out.args = (flat,)
        return PassResult(gm, True, 1)


def test_verification_names_the_failing_pass_and_those_before(monkeypatch):
    monkeypatch.setitem(pipeline.REGISTRY, "break-shapes", BreakShapes)
    gm = twistc.trace(Net().eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(PassError, match=r"after pass 'break-shapes' \(after: lower-conv-tucker\{ratio=2\}\).*shapes"):
        Pipeline.parse("lower-conv-tucker{ratio=2},break-shapes").run(gm)


def test_pass_results_are_honest():
    gm = twistc.trace(Net().eval(), (torch.randn(1, 3, 8, 8),))
    first = pipeline.stage_class("lower-conv-tucker").from_options({"ratio": "2"})(gm)
    second = pipeline.stage_class("lower-conv-tucker").from_options({"ratio": "2"})(gm)
    assert (first.modified, first.rewrites) == (True, 1)  # conv2; the stem conv1 stays dense
    assert (second.modified, second.rewrites) == (False, 0)


@pytest.mark.parametrize("spec, message", [
    ("lower-conv-tucker{ratio=2},fold,train{epochs=1},cleanup", "fold freezes BatchNorm into the convs"),
    ("lower-conv-tucker{ratio=2},train{epochs=1,handoff=continue}", "continues an earlier train stage"),
])
def test_the_python_api_refuses_a_misordered_pipeline_before_it_runs(spec, message):
    gm = twistc.trace(Net().eval(), (torch.randn(1, 3, 16, 16),))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(SpecError, match=message):
        Pipeline.parse(spec).run(gm)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())  # nothing ran


def test_steps_a_python_caller_may_do_itself_are_left_to_it():
    gm = twistc.trace(Net().eval(), (torch.randn(1, 3, 16, 16),))
    gm = Pipeline.parse("deeptwist{ratio=2}").run(gm)  # the caller trains in its own loop
    with pytest.raises(SpecError, match="deeptwist needs a train stage"):
        Pipeline.parse("deeptwist{ratio=2}").check_whole()  # a whole compilation must say how it trains
