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
    assert uniform["compressed"] == 2 and uniform["forms"]["tucker-chain"] == 2  # the 1x1 conv stays dense
    for label, v in variants.items():
        if "failed" not in v:
            assert v["speedup"] > 0 and v["speedup_ci95"][0] <= v["speedup"] <= v["speedup_ci95"][1]
            assert ("predicted_speedup" in v) == label.startswith("plan") and v["plan"]
    text = (out / "results.md").read_text()
    assert "| resnet32 | b1t1 | uniform r=2 |" in text and (out / "predicted_vs_measured.png").is_file()
    specs = lp.finetune_specs(lp.expkit.RunStore(out))
    assert list(specs)[0] == "finetune-conventional-uniformr2" and list(specs)[-1].startswith("finetune-deeptwist-")
    assert all(plan is not None for rid, (_, plan) in specs.items() if "plan" in rid)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_a_cuda_setting_needs_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        lp.main(["--models", "resnet32", "--settings", "cuda-b1", "--out", str(tmp_path / "lp")])
    assert exit.value.code == 2
    assert "setting cuda-b1 times on CUDA, and this torch sees no GPU" in capsys.readouterr().err
