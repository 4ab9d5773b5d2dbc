from types import SimpleNamespace

import numpy as np
import pytest

import expkit
import tiled_table

needs_data = pytest.mark.skipif(not (expkit.SHARED_DATA / "resnet32_cifar10.pt").is_file(),
                                reason="../shared/data is not on this machine")


def test_pipelines_of_each_scheme():
    train = "train{epochs=3,lr=0.01,seed=0}"
    assert tiled_table.pipelines("tiled 32x32", 2, train, 200) == [
        f"deeptwist{{decomp=tiled-svd,tile=32x32,layers={tiled_table.LAYERS},ratio=2,period=200}},{train},"
        "lower-conv-tiled-lowrank,cleanup"]
    assert "order=tap-major" in tiled_table.pipelines("tiled 64x64 tap-major", 4, train, 200)[0]
    assert tiled_table.pipelines("tucker-conv", 4, train, 200)[1] == train
    assert len(tiled_table.GRID) == 17


def test_runs_cover_the_table_4x_first_and_a_second_seed_at_4x():
    runs = tiled_table.RUNS
    assert len(set(runs)) == len(runs)
    assert sorted((s, r) for s, r, seed in runs if seed == 0) == sorted(tiled_table.GRID)
    assert runs[:len(tiled_table.SCHEMES)] == [(s, 4, 0) for s in tiled_table.SCHEMES]
    assert sorted(s for s, r, seed in runs if seed == 1 and r == 4) == sorted(tiled_table.SCHEMES)
    assert tiled_table.run_id("svd", 4, 1) == "svd-r4-s1"
    assert tiled_table.run_id("tiled 8x8", 2) == "tiled-8x8-r2"


def fake_run(scheme, seed, correct):
    return {"scheme": scheme, "ratio_requested": 4, "seed": seed, "test_acc": float(np.mean(correct)),
            "test_correct": expkit.pack_bools(np.array(correct)), "test_n": len(correct), "seconds": 60,
            "plan": {"a": {"ranks": [2]}}, "macs_before": 4, "macs_after": 1, "command": "c",
            "machine": {"cpu": "cpu"}}


def test_report_lists_both_seeds_and_pairs_them_with_the_best_scheme(tmp_path):
    store = expkit.RunStore(tmp_path)
    correct = np.arange(1000) % 10 < 9                     # 90%
    store.save("svd-r4", fake_run("svd", 0, correct))
    store.save("svd-r4-s1", fake_run("svd", 1, correct & (np.arange(1000) % 100 != 0)))  # 89%
    store.save("tucker-r4", fake_run("tucker", 0, np.arange(1000) % 20 < 17))          # 85%
    budget = SimpleNamespace(baseline_acc=0.9, epochs=3, lr=0.01, batch=128, smoke=False)
    tiled_table.report(store, budget)
    text = (tmp_path / "results.md").read_text()
    assert "| 4x | svd | 2 | - | 90.00 / 89.00 | - |" in text            # best: mean 89.5 > 85
    assert "| 4x | tucker | 2 | - | 85.00 | -5.00 [" in text            # paired on seed 0 only
    assert "| 2x | svd | - | - | not run yet |" in text


@needs_data
@pytest.mark.slow
def test_smoke_trains_lowers_and_reports(tmp_path):
    assert tiled_table.main(["--smoke", "--out", str(tmp_path)]) == 0
    runs = {r["scheme"]: r for r in expkit.RunStore(tmp_path).load_all()}
    tiled = runs["tiled 16x16"]
    # 4x fewer numbers in the tile factors; the one-hot im2col kernels that 16x16 tiles need count too
    assert tiled["compressed_layers"] == 9 and 2 < tiled["layers_ratio"] < 4
    assert {tuple(e["ranks"]) for e in tiled["plan"].values()} == {(2,)}  # the paper's rank at 16x16, 4x
    assert all(e["lowering"] == "tiled-lowrank" and e["tile"] == [16, 16] for e in tiled["plan"].values())
    assert runs["tucker-conv"]["compressed_layers"] == 9
    text = (tmp_path / "results.md").read_text()
    assert "| 4x | tiled 16x16 | 2 | 93.00 (r=2) |" in text
    worse = min(runs.values(), key=lambda r: r["test_acc"])
    gap = 100 * (worse["test_acc"] - max(r["test_acc"] for r in runs.values()))
    assert f"| {gap:+.2f} [" in text  # the worse scheme's difference from the best, with its CI
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
