import json

import pytest
import torch

import twistc
from twistc.errors import SpecError
from twistc.pipeline import Pipeline
from twistc.plan import LayerPlan, Plan
from models_for_tests import Net

X = torch.randn(1, 3, 12, 12)


def test_plan_round_trips_through_json(tmp_path):
    plan = Plan({"conv1": LayerPlan("tucker", (4, 2), "tucker-chain", ratio=2.0), "conv2": LayerPlan("none", (), "none")})
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_json()))
    assert Plan.load(path) == plan
    path.write_text(json.dumps({"layers": [], "plan": plan.to_json()}))  # a report.json works too
    assert Plan.load(path) == plan


def test_plan_entries_override_pass_options():
    gm = twistc.trace(Net().eval(), (X,))
    state = twistc.state_of(gm)
    state.plan = Plan({"conv2": LayerPlan("tucker", (5, 3), "tucker-chain"), "conv1": LayerPlan("none", (), "none")})
    gm = Pipeline.parse("lower-conv-tucker{ratio=2}").run(gm)
    assert gm.conv2.core.weight.shape[:2] == (5, 3)
    assert state.layers["conv1"].skip_reason == "left dense by the plan"


@pytest.mark.parametrize("entry,message", [
    ({"decomp": "block-term", "ranks": [2]}, "decomp must be one of"),
    ({"decomp": "tucker", "ranks": "4x2"}, "list of integers"),
    ({"decomp": "tucker", "ranks": [2, 2], "speed": 1}, "unknown keys"),
    (5, "plan entry 'conv1' is 5, not an object"),
    ([16, 8], "not an object"),
])
def test_bad_plan_entries(entry, message):
    with pytest.raises(SpecError, match=message):
        Plan.from_json({"conv1": entry})


def test_plan_ranks_above_full_rank_are_rejected():
    gm = twistc.trace(Net().eval(), (X,))
    twistc.state_of(gm).plan = Plan({"conv1": LayerPlan("tucker", (4, 9), "tucker-chain")})
    with pytest.raises(twistc.TwistcError, match="r_in=9 is outside 1..3"):
        Pipeline.parse("lower-conv-tucker").run(gm)
