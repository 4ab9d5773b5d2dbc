import json

import pytest
import torch
from torch import nn

import latency_plan as lp


def _wide(checkpoint):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def test_compares_uniform_and_planned_variants_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(lp, "MODELS", {"resnet32": (_wide, (1, 3, 24, 24))})
    monkeypatch.setattr(lp, "TARGETS", (1.2,))
    out = tmp_path / "lp"
    assert lp.main(["--settings", "b1t1", "--reps", "3", "--out", str(out),
                    "--latency-cache", str(tmp_path / "cache.json")]) == 0
    run = json.loads((out / "runs" / "resnet32-b1t1.json").read_text())
    variants = run["variants"]
    uniform = variants["uniform r=2"]
    macs = [label for label in variants if label.startswith("plan macs=")]
    assert set(variants) == {"uniform r=2", "uniform r=4", "plan 1.2x", *macs} and len(macs) == 1
    # the MAC cut of uniform r=2's Tucker ranks, which fold's exact merges can only raise
    assert 1 < float(macs[0].removeprefix("plan macs=")) <= uniform["mac_ratio"] + 0.005
    assert uniform["compressed"] == 1 and uniform["forms"]["tucker-chain"] == 1  # the stem and the 1x1 conv stay dense
    for label, v in variants.items():
        if "failed" not in v:
            assert v["speedup"] > 0 and v["speedup_ci95"][0] <= v["speedup"] <= v["speedup_ci95"][1]
            assert ("predicted_speedup" in v) == label.startswith("plan") and v["plan"]
    text = (out / "results.md").read_text()
    assert "| resnet32 | b1t1 | uniform r=2 |" in text and (out / "predicted_vs_measured.png").is_file()
    specs = lp.finetune_specs(lp.expkit.RunStore(out), lp.expkit.Budget("data", "checkpoint"), seed=0)
    assert list(specs)[0] == "finetune-conventional-uniformr2" and list(specs)[-1].startswith("finetune-deeptwist-")
    assert all(plan is not None for rid, (_, plan) in specs.items() if "plan" in rid)


def test_the_best_recipes_run_under_the_same_plan_and_meet_their_references(tmp_path):
    store = lp.expkit.RunStore(tmp_path)
    plan = {"conv": {"decomp": "tucker", "ranks": [4, 4], "lowering": "tucker-chain"}}
    store.save("resnet32-b1t1", {"variants": {"uniform r=2": {"spec": "lower-conv-tucker{ratio=2},fold,cleanup"},
                                              "plan 1.5x": {"plan": plan}}})
    specs = lp.finetune_specs(store, lp.expkit.Budget("data", "checkpoint"), seed=1)
    assert specs["finetune-conventional-distill-plan1.5x"] == (
        ["lower,cleanup", "train{epochs=3,lr=0.01,seed=1,distill=0.5,temperature=4}"], plan)
    [handoff], same = specs["finetune-handoff-distill-plan1.5x"]
    assert same == plan and handoff == ("deeptwist{period=50},train{epochs=2,lr=0.01,seed=1,distill=0.5,temperature=4},"
                                        "lower,train{epochs=1,lr=0.01,seed=1,distill=0.5,temperature=4,"
                                        "handoff=continue},cleanup")
    correct = lp.expkit.pack_bools(torch.ones(20, dtype=torch.bool).numpy())
    runs = [{"run": f"finetune-{arm}-plan1.5x", "test_acc": 1.0, "test_correct": correct, "test_n": 20,
             "layers_ratio": 2.0, "steps": 1, "distortions": 0, "seconds": 60}
            for arm in ("conventional", "conventional-distill", "handoff-distill", "deeptwist")]
    against = {row[0]: row[3].split(":")[0] for row in lp.finetune_rows(runs)}
    assert against == {"conventional-plan1.5x": "-", "conventional-distill-plan1.5x": "conventional-plan1.5x",
                       "handoff-distill-plan1.5x": "conventional-distill-plan1.5x",
                       "deeptwist-plan1.5x": "conventional-plan1.5x"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_a_cuda_setting_needs_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        lp.main(["--models", "resnet32", "--settings", "cuda-b1", "--out", str(tmp_path / "lp")])
    assert exit.value.code == 2
    assert "setting cuda-b1 times on CUDA, and this torch sees no GPU" in capsys.readouterr().err
