"""DeepTwist vs. conventional fine-tuning of the digits transformer, with and without the usual
transformer recipe (linear warmup over the first 10% of steps, gradient clipping at norm 1).

The model is examples/digits_transformer.py (trained from scratch, 96.67% on its 360 held-out
images). Its 12 attention and MLP Linears are cut 2x in weights (the 2x2 patch embedding, a stem,
and the classifier head stay dense):

  deeptwist:    deeptwist{decomp=svd,ratio=2,period=25},train{...},lower-conv-svd,lower-linear-svd,fold,cleanup
  conventional: lower-conv-svd{ratio=2},lower-linear-svd{ratio=2},train{...},fold,cleanup

train{...} is AdamW for 15 epochs (675 steps) at each peak learning rate, cosine decay, seeds 0-2;
the recipe adds warmup=67,clip_grad=1 (warmup over 10% of the steps), and each half of it alone.
Then DeepTwist's S_D is swept at its best lr and recipe, and S_D adapted by target_change is tried
at every lr.
Accuracy is on the held-out images; the paired bootstrap pools the seeds. Each run is one file
under results/transformer_recipe/runs/; reruns skip them.

    python tools/transformer_recipe.py --threads 1
    python tools/transformer_recipe.py --report-only
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

import expkit

from twistc import Pipeline, RunContext, trace
from twistc.modelfile import load_model_file

log = logging.getLogger("transformer_recipe")
MODEL_FILE = expkit.REPO / "examples" / "digits_transformer.py"
EPOCHS, STEPS = 15, 675
RECIPES = {"plain": "", "warmup-clip": f",warmup={STEPS // 10},clip_grad=1",  # and each half alone
           "warmup": f",warmup={STEPS // 10}", "clip": ",clip_grad=1"}
LRS = (0.001, 0.003, 0.01)
SEEDS = (0, 1, 2)
ARMS = ("deeptwist", "conventional")
SCHEDULE = "sd25"  # DeepTwist's schedule in the main grid: S_D = 25
SWEEP = (0.01, "warmup", ("sd1", "sd2", "sd5", "sd10", "sd50", "sd100"))  # at DeepTwist's best lr and recipe
ADAPTIVE = ("warmup", ("tc0.005", "tc0.01", "tc0.02"))  # target_change from S_D = 25, at every lr


def deeptwist_options(schedule: str) -> str:
    """sdN: S_D = N; tcX: S_D adapted from 25 so that a projection removes about X of a kernel's norm."""
    return f"period={schedule[2:]}" if schedule.startswith("sd") else f"period=25,target_change={schedule[2:]}"


def pipeline(arm: str, lr: float, recipe: str, seed: int, schedule: str = SCHEDULE) -> str:
    train = f"train{{epochs={EPOCHS},optimizer=adamw,lr={lr:g},seed={seed}{RECIPES[recipe]}}}"
    if arm == "deeptwist":
        return (f"deeptwist{{decomp=svd,ratio=2,{deeptwist_options(schedule)}}},{train},lower-conv-svd,"
                "lower-linear-svd,fold,cleanup")
    return f"lower-conv-svd{{ratio=2}},lower-linear-svd{{ratio=2}},{train},fold,cleanup"


def run_id(arm: str, lr: float, recipe: str, seed: int, schedule: str = SCHEDULE) -> str:
    return f"{arm}-lr{lr:g}-{recipe}" + (f"-{schedule}" if schedule != SCHEDULE else "") + f"-s{seed}"


def grid() -> list[tuple]:
    """(arm, lr, recipe, seed, schedule) of every run: the main grid, DeepTwist's S_D sweep, adaptive S_D."""
    main = [(arm, lr, recipe, seed, SCHEDULE) for lr in LRS for recipe in RECIPES for seed in SEEDS for arm in ARMS]
    lr, recipe, periods = SWEEP
    sweep = [("deeptwist", lr, recipe, seed, sd) for sd in periods for seed in SEEDS]
    recipe, targets = ADAPTIVE
    return main + sweep + [("deeptwist", lr, recipe, seed, tc) for lr in LRS for tc in targets for seed in SEEDS]


def run(mf, original, arm: str, lr: float, recipe: str, seed: int, schedule: str = SCHEDULE) -> dict:
    spec = pipeline(arm, lr, recipe, seed, schedule)
    start = time.perf_counter()
    gm = trace(copy.deepcopy(original), mf.example_inputs())
    ctx = RunContext(mf.data("train_data"), None, progress=False)
    gm = Pipeline.parse(spec).run(gm, ctx)
    correct = expkit.correctness(gm, mf.data("eval_data")())
    train = ctx.results["train"]
    return {"arm": arm, "lr": lr, "recipe": recipe, "seed": seed, "schedule": schedule if arm == "deeptwist" else "",
            "pipeline": spec, "test_acc": float(correct.mean()), "test_n": int(correct.size),
            "test_correct": expkit.pack_bools(correct), "steps": train.steps, "distortions": train.distortions,
            "losses": train.losses, "distortion_changes": train.distortion_changes,
            "minutes": (time.perf_counter() - start) / 60, **expkit.metadata()}


def _key(r: dict) -> tuple:
    schedule = r.get("schedule", f"sd{r['period']}" if "period" in r else SCHEDULE) if r["arm"] == "deeptwist" else ""
    return r["arm"], r["lr"], r["recipe"], r["seed"], schedule


def _mean(accs: list[float]) -> str:
    return f"{100 * np.mean(accs):.2f} ({' / '.join(f'{100 * v:.2f}' for v in accs)})"


def _late_change(runs: list[dict]) -> str:
    """expkit.late_change, averaged over the runs."""
    changes = [expkit.late_change(r) for r in runs]
    return "-" if None in changes else f"{100 * np.mean(changes):.1f}%"


def report(store: expkit.RunStore, out: Path, baseline: float) -> str:
    runs = {_key(r): r for r in store.load_all()}
    dt = lambda lr, recipe, schedule: [runs[k] for s in SEEDS if (k := ("deeptwist", lr, recipe, s, schedule)) in runs]
    conv = lambda lr, recipe, seed: runs.get(("conventional", lr, recipe, seed, ""))
    versus = lambda rs, lr, recipe: expkit.paired_difference([(a, conv(lr, recipe, a["seed"])) for a in rs
                                                               if conv(lr, recipe, a["seed"])])
    rows = []
    for lr in LRS:
        for recipe in RECIPES:
            d, c = dt(lr, recipe, SCHEDULE), [r for s in SEEDS if (r := conv(lr, recipe, s))]
            if d and c:
                rows.append([f"{lr:g}", recipe, _mean([r["test_acc"] for r in d]), _mean([r["test_acc"] for r in c]),
                             versus(d, lr, recipe)])
    best = max(((lr, recipe) for lr in LRS for recipe in RECIPES if all(conv(lr, recipe, s) for s in SEEDS)),
               key=lambda c: np.mean([conv(*c, s)["test_acc"] for s in SEEDS]), default=None)
    lr, recipe, periods = SWEEP
    sweep_rows = []
    for sd in sorted({SCHEDULE, *periods}, key=lambda x: int(x[2:])):
        d = dt(lr, recipe, sd)
        if d:
            sweep_rows.append([sd[2:], _mean([r["test_acc"] for r in d]), versus(d, lr, recipe),
                               versus(d, *best) if best else "-",
                               _late_change(d)])
    recipe, targets = ADAPTIVE
    adaptive_rows = []
    for lr in LRS:
        for schedule in (SCHEDULE, *targets):
            d = dt(lr, recipe, schedule)
            if d:
                name = f"S_D = {schedule[2:]}" if schedule.startswith("sd") else f"target_change={schedule[2:]}"
                distorted = f"{np.mean([r.get('distortions', np.nan) for r in d]):.0f}"
                adaptive_rows.append([f"{lr:g}", name, _mean([r["test_acc"] for r in d]), versus(d, lr, recipe),
                                      versus(d, *best) if best else "-", distorted, _late_change(d),
                                      f"{60 * np.mean([r['minutes'] for r in d]):.1f}"])
    any_run = next(iter(runs.values()), {})
    best_text = f" (lr {best[0]:g}, `{best[1]}`)" if best else ""
    text = "\n\n".join([
        "# DeepTwist vs. conventional fine-tuning of the digits transformer, with the transformer recipe",
        f"Model: `examples/digits_transformer.py`, {100 * baseline:.2f}% on its {any_run.get('test_n', 360)} "
        f"held-out images before compression. Both arms cut its 12 attention and MLP Linears 2x in weights (SVD) and "
        f"fine-tune with AdamW for {EPOCHS} epochs ({STEPS} steps), cosine decay from the peak lr; DeepTwist "
        f"uses S_D = 25 unless a table says otherwise. Recipe `warmup-clip` adds `warmup={STEPS // 10},clip_grad=1`; "
        f"`warmup` and `clip` each half of it alone. Accuracy: mean over seeds {', '.join(map(str, SEEDS))} "
        "(each seed in brackets). DT - conv: paired bootstrap over the held-out images, seeds pooled.",
        expkit.markdown_table(["peak lr", "recipe", "DeepTwist %", "conventional %", "DT - conv, 95% CI"], rows),
        f"## DeepTwist's S_D at lr {lr:g}, recipe `{SWEEP[1]}`\n\nAgainst conventional fine-tuning with the same "
        f"lr and recipe, and against conventional fine-tuning at its best setting{best_text}, seeds paired. Kernel "
        "change: what a distortion removes from a kernel's norm, averaged over the second half of training.\n\n"
        + expkit.markdown_table(["S_D", "DeepTwist %", "DT - conv (same lr and recipe), 95% CI",
                                 "DT - conv at its best, 95% CI", "kernel change at a distortion"], sweep_rows),
        f"## Adaptive S_D (`deeptwist{{target_change=X}}`, starting at S_D = 25), recipe `{recipe}`\n\n"
        f"Against conventional fine-tuning with the same lr and recipe, and at its best setting{best_text}, seeds "
        "paired. Distortions: steps at which at least one layer was projected (each layer keeps its own S_D).\n\n"
        + expkit.markdown_table(["peak lr", "schedule", "DeepTwist %", "DT - conv (same lr and recipe), 95% CI",
                                 "DT - conv at its best, 95% CI", "distortions", "kernel change at a distortion",
                                 "seconds per run (whole pipeline)"],
                                adaptive_rows),
        f"Command: `{any_run.get('command', 'python tools/transformer_recipe.py')}`; machine: "
        f"{any_run.get('machine', {}).get('cpu', '?')}.",
    ]) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"baseline": baseline, "rows": rows, "sweep": sweep_rows,
                                                  "adaptive": adaptive_rows}, indent=1) + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(expkit.REPO / "results" / "transformer_recipe"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    store = expkit.RunStore(out)
    mf = load_model_file(MODEL_FILE)
    original = mf.model().eval()
    baseline = float(expkit.correctness(original, mf.data("eval_data")()).mean())
    for cell in ([] if args.report_only else grid()):
        rid = run_id(*cell)
        if not store.done(rid):
            result = run(mf, original, *cell)
            store.save(rid, result)
            log.info("%s: %.2f%% in %.1f min", rid, 100 * result["test_acc"], result["minutes"])
    print(report(store, out, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(expkit.resumable(main))
