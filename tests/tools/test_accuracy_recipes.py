import json

import pytest

import accuracy_recipes as exp
import expkit

needs_data = pytest.mark.skipif(not (expkit.SHARED_DATA / "resnet32_cifar10.pt").is_file(),
                                reason="../shared/data is not on this machine")


def test_arms_build_the_pipelines_they_name():
    budget = expkit.Budget("data", "checkpoint", epochs=3)
    [handoff] = exp.pipelines(budget, "handoff-fit-distill", 6.7, 0.67, 50, 0)
    assert handoff.startswith("calibrate{batches=16,layers=layer*},deeptwist{layers=layer*,ratio=6.7,period=50,"
                              "fit=activation},train{epochs=2,")
    assert "lower-conv-tucker,train{epochs=1," in handoff and handoff.endswith(
        "distill=0.5,temperature=4,handoff=continue},cleanup")
    lower, train = exp.pipelines(budget, "conventional-distill", 4.3, None, None, 1)
    assert lower == "lower-conv-tucker{layers=layer*,ratio=4.3},cleanup" and "seed=1,distill=0.5" in train
    assert exp.run_id("handoff-distill", 6.7, 0.67, 50, 0, 3) == "handoff0.67-distill-r6.7-sd50-e3-s0"
    [rewind] = exp.pipelines(budget, "handoff-rewind-distill", 6.7, 0.33, 50, 0)
    assert "train{epochs=1," in rewind and rewind.endswith("temperature=4,handoff=rewind},cleanup")
    assert exp.run_id("handoff-rewind-distill", 6.7, 0.33, 50, 0, 30) == "handoff0.33-rewind-distill-r6.7-sd50-e30-s0"
    [ramp] = exp.pipelines(expkit.Budget("data", "checkpoint", epochs=30), "handoff-ramp-distill", 6.7, 0.33, 50, 0)
    assert ramp.startswith("deeptwist{layers=layer*,ratio=6.7,period=50,ramp=1955},train{epochs=10,")  # 5 of 391-step epochs


@needs_data
@pytest.mark.slow
def test_smoke_runs_a_handoff_with_distillation_and_reports_it(tmp_path):
    out = tmp_path / "smoke"
    assert exp.main(["--smoke", "--out", str(out), "--only", "handoff0.67-distill-r4.3-sd50-e2-s0"]) == 0
    [run] = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert [p["handoff"] for p in run["phases"]] == ["none", "continue"] and run["teacher_seconds"] > 0
    assert "| 4.3x | 2 | 0 | handoff0.67-distill |" in (out / "results.md").read_text()
