import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import expkit  # noqa: E402
import tiled_table  # noqa: E402

needs_data = pytest.mark.skipif(not (expkit.SHARED_DATA / "resnet32_cifar10.pt").is_file(),
                                reason="../shared/data is not on this machine")


def test_pipelines_of_each_scheme():
    train = "train{epochs=3,lr=0.01,seed=0}"
    assert tiled_table.pipelines("tiled 32x32", 2, train, 200) == [
        f"deeptwist{{decomp=tiled-svd,tile=32x32,layers={tiled_table.LAYERS},ratio=2,period=200}},{train},"
        "lower-conv-tiled-lowrank,cleanup"]
    assert "order=tap-major" in tiled_table.pipelines("tiled 64x64 tap-major", 4, train, 200)[0]
    assert tiled_table.pipelines("tucker-conv", 4, train, 200)[1] == train
    assert len(tiled_table.GRID) == 15


@needs_data
def test_smoke_trains_lowers_and_reports(tmp_path):
    assert tiled_table.main(["--smoke", "--out", str(tmp_path)]) == 0
    runs = {r["scheme"]: r for r in expkit.RunStore(tmp_path).load_all()}
    tiled = runs["tiled 16x16"]
    assert tiled["compressed_layers"] == 9 and tiled["layers_ratio"] == pytest.approx(4.0)
    assert {tuple(e["ranks"]) for e in tiled["plan"].values()} == {(2,)}  # the paper's rank at 16x16, 4x
    assert all(e["lowering"] == "tiled-lowrank" and e["tile"] == [16, 16] for e in tiled["plan"].values())
    assert runs["tucker-conv"]["compressed_layers"] == 9
    text = (tmp_path / "results.md").read_text()
    assert "| 4x | tiled 16x16 | 2 | 93.00 (r=2) |" in text
    worse = min(runs.values(), key=lambda r: r["test_acc"])
    gap = 100 * (worse["test_acc"] - max(r["test_acc"] for r in runs.values()))
    assert f"| {gap:+.2f} [" in text  # the worse scheme's difference from the best, with its CI
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
