import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

import deeptwist_vs_tucker as exp
import expkit

TOOLS = Path(__file__).resolve().parents[2] / "tools"

needs_data = pytest.mark.skipif(not (expkit.SHARED_DATA / "resnet32_cifar10.pt").is_file(),
                                reason="../shared/data is not on this machine")


@needs_data
@pytest.mark.slow
def test_smoke_runs_both_arms_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "smoke"
    assert exp.main(["--smoke", "--out", str(out), "--max-runs", "1", "--eval-every", "1"]) == 0  # stops after one run
    assert [p.name for p in (out / "runs").iterdir()] == ["deeptwist-r4.3-sd1-e1-s0.json"]
    first = (out / "runs" / "deeptwist-r4.3-sd1-e1-s0.json").read_text()

    calls = []
    real_run = exp.run
    monkeypatch.setattr(exp, "run", lambda cfg, *spec: calls.append(spec) or real_run(cfg, *spec))
    assert exp.main(["--smoke", "--out", str(out)]) == 0
    assert calls == [("conventional", 4.3, 1, 0, 0, False, "conventional-r4.3-e1-s0", None, 0, None)]  # the finished run was not recomputed
    assert (out / "runs" / "deeptwist-r4.3-sd1-e1-s0.json").read_text() == first

    runs = {r["arm"]: r for r in expkit.RunStore(out).load_all()}
    dt, cv = runs["deeptwist"], runs["conventional"]
    assert dt["pipelines"][0].startswith("deeptwist{layers=layer*,ratio=4.3,period=1},train{")
    assert cv["pipelines"][0] == "lower-conv-tucker{layers=layer*,ratio=4.3},cleanup"
    assert dt["compressed_layers"] == cv["compressed_layers"] == 30
    assert dt["layers_ratio"] == pytest.approx(cv["layers_ratio"]) and dt["layers_ratio"] >= 4.3
    assert dt["model_ratio"] < dt["layers_ratio"]
    assert dt["steps"] == cv["steps"] == 2 and dt["distortions"] == 2 and cv["distortions"] == 0
    assert dt["final_projections"] == 30 and 0 <= dt["test_acc_before_final_projection"] <= 1
    assert cv["test_acc_before_final_projection"] is None  # nothing to project in the conventional arm
    [evaluation] = dt["evaluations"]  # --eval-every 1 over the one smoke epoch; not asked for in the second call
    assert evaluation["accuracy"] == dt["test_acc_before_final_projection"] and cv["evaluations"] == []
    assert 0 <= evaluation["low_rank_accuracy"] <= 1
    assert len(expkit.unpack_bools(dt["test_correct"], dt["test_n"])) == dt["test_n"] == 200
    assert "test_acc_decomposed" in cv and 0 <= cv["test_acc"] <= 1
    assert dt["projection_change"].keys() == cv["projection_change"].keys() and len(dt["projection_change"]) == 30
    assert all(0 < c["checkpoint"] < 1 and 0 <= c["final"] < 1 for c in dt["projection_change"].values())
    assert all(c["final"] is None for c in cv["projection_change"].values())
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.json", "accuracy_vs_ratio.png",
                                               "accuracy_during_training.png"}
    text = (out / "results.md").read_text()
    assert "| 4.47x (asked 4.3)" in text
    assert "| deeptwist-r4.3-sd1-e1-s0 | 0." in text and " -> 0." in text  # projection change per stage
    assert json.loads((out / "results.json").read_text())["runs"][0]["command"]


def test_investigation_options_get_their_own_run_ids():
    assert exp.run_id("deeptwist", 4.3, 200, 0, exp.variant(0.01, 100)) == "deeptwist-r4.3-sd200-bn100-s0"
    assert exp.run_id("deeptwist", 4.3, 200, 0, exp.variant(0.03, 0, True)) == "deeptwist-r4.3-sd200-lr0.03-mr-s0"
    assert exp.run_id("conventional", 4.3, 200, 1, exp.variant(0.01)) == "conventional-r4.3-s1"
    assert (exp.run_id("deeptwist", 6.7, 200, 0, exp.variant(0.01, epochs=30, late=(50, 9000)))
            == "deeptwist-r6.7-sd200-e30-late50at9000-s0")
    assert exp.run_id("deeptwist", 6.7, 200, 0, exp.variant(0.01, rectify=20)) == "deeptwist-r6.7-sd200-rb20-s0"
    assert exp.pipelines("deeptwist", 6.7, 200, "train", (50, 9000))[0].startswith(
        "deeptwist{layers=layer*,ratio=6.7,period=200,late_period=50,late_after=9000},train")
    assert exp.run_id("deeptwist", 6.7, 50, 0, exp.variant(0.01, target=0.005)) == "deeptwist-r6.7-sd50-tc0.005-s0"
    assert exp.pipelines("deeptwist", 6.7, 50, "train", target=0.005)[0].startswith(
        "deeptwist{layers=layer*,ratio=6.7,period=50,target_change=0.005},train")


def test_only_refuses_a_run_the_options_do_not_make(capsys):
    with pytest.raises(SystemExit) as exit:
        exp.main(["--epochs", "30", "--only", "deeptwist-r4.3-sd50-s0"])  # the 3-epoch id
    assert exit.value.code == 2
    assert "--only names runs that these options do not make: deeptwist-r4.3-sd50-s0" in capsys.readouterr().err


def test_paired_bootstrap_interval_covers_the_difference():
    rng = np.random.default_rng(1)
    a = rng.random(4000) < 0.92
    b = a.copy()
    b[:80] = ~b[:80]  # b differs on 80 images
    mean, lo, hi = expkit.paired_bootstrap(a, b, reps=2000)
    assert mean == pytest.approx(a.mean() - b.mean())
    assert lo < mean < hi and hi - lo < 0.01
    same = expkit.paired_bootstrap(a, a, reps=200)
    assert same == (0.0, 0.0, 0.0)


def test_bool_packing_round_trips():
    x = np.random.default_rng(0).random(1001) < 0.5
    assert np.array_equal(expkit.unpack_bools(expkit.pack_bools(x), 1001), x)


@needs_data
@pytest.mark.slow
def test_gpu_batch_packs_the_finished_runs(tmp_path):
    here = tmp_path / "carried"
    here.mkdir()
    for name in ("cifar10-jpg.tar.gz", "resnet32_cifar10.pt"):
        (here / name).symlink_to(expkit.SHARED_DATA / name)
    env = {**os.environ, "RUNS": "deeptwist-r4.3-sd1-e1-s0", "OPTIONS": "--smoke", "DEVICE": "cpu",
           "HERE": str(here), "OUT": str(tmp_path / "out"), "LIMIT": "300"}
    done = subprocess.run(["bash", str(TOOLS / "gpu_batch.sh")], cwd=TOOLS.parent, env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    assert "test acc" in done.stdout
    with tarfile.open(tmp_path / "out" / "runs.tgz") as packed:
        assert packed.getnames() == ["runs", "runs/deeptwist-r4.3-sd1-e1-s0.json"]
    assert not (tmp_path / "out" / "checkpoints.tgz").exists()  # nothing was stopped


def test_a_run_resumed_elsewhere_names_each_machine_in_turn():
    run = {"machine": {"cpu": "AMD EPYC"},
           "train_sessions": [{"hardware": h} for h in ("NVIDIA H200", "AMD EPYC", "AMD EPYC", "Intel Xeon")]}
    assert expkit.machines(run) == "NVIDIA H200 -> AMD EPYC -> Intel Xeon"
    assert expkit.machines({**run, "train_sessions": [{"hardware": "AMD EPYC"}] * 2}) == "AMD EPYC"
    assert expkit.machines({"machine": {"cpu": "AMD EPYC", "gpu": "NVIDIA H100"}}) == "NVIDIA H100"  # older runs
