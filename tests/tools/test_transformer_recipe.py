import pytest
"""tools/transformer_recipe.py: both arms with and without the recipe, resumable runs, the report."""
import json

import transformer_recipe as tool

from twistc import Pipeline


def test_pipelines_parse_and_differ_only_in_the_recipe():
    for arm in tool.ARMS:
        specs = {r: tool.pipeline(arm, 0.003, r, 1) for r in tool.RECIPES}
        for spec in specs.values():
            Pipeline.parse(spec)
        for recipe, options in (("warmup-clip", "warmup=67,clip_grad=1"), ("warmup", "warmup=67"), ("clip", "clip_grad=1")):
            assert specs[recipe] == specs["plain"].replace("seed=1}", f"seed=1,{options}}}")
    assert "period=25,target_change=0.01}" in tool.pipeline("deeptwist", 0.01, "warmup", 0, "tc0.01")
    assert "period=5}" in tool.pipeline("deeptwist", 0.01, "warmup", 0, "sd5")


@pytest.mark.slow
def test_smoke_runs_every_cell_once_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(tool, "EPOCHS", 1)
    monkeypatch.setattr(tool, "LRS", (0.003,))
    monkeypatch.setattr(tool, "SEEDS", (0,))
    monkeypatch.setattr(tool, "SWEEP", (0.003, "warmup", ("sd5",)))
    monkeypatch.setattr(tool, "ADAPTIVE", ("warmup", ("tc0.01",)))
    assert tool.main(["--out", str(tmp_path)]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert runs == sorted([f"{a}-lr0.003-{r}-s0.json" for a in tool.ARMS for r in tool.RECIPES]
                          + ["deeptwist-lr0.003-warmup-sd5-s0.json", "deeptwist-lr0.003-warmup-tc0.01-s0.json"])
    run = json.loads((tmp_path / "runs" / runs[0]).read_text())
    assert run["steps"] == 45 and run["test_n"] == 360 and 0 < run["test_acc"] <= 1
    before = (tmp_path / "runs" / runs[0]).stat().st_mtime_ns
    assert tool.main(["--out", str(tmp_path)]) == 0  # finished runs are skipped
    assert (tmp_path / "runs" / runs[0]).stat().st_mtime_ns == before
    table = (tmp_path / "results.md").read_text()
    assert "| 0.003 | plain |" in table and "| 0.003 | warmup-clip |" in table
    assert "| 5 | " in table and "| 25 | " in table  # the S_D sweep, with the main grid's S_D
    assert "| 0.003 | target_change=0.01 | " in table
