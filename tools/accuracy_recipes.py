"""Accuracy at a given compression: hand-off and distillation recipes on CIFAR-10 ResNet-32.

Every arm starts from the same pre-trained checkpoint, compresses the 30 3x3 convs of the residual
stages by Tucker-2 at the same per-layer ratio, and gets the same budget (epochs, SGD Nesterov,
cosine lr from 0.01, batch 128, weight decay 5e-4) as results/deeptwist_vs_tucker, whose
conventional and DeepTwist runs are the reference arms here (read from its runs/, paired by seed):

  conventional + distill   lower-conv-tucker,cleanup  then  train{distill=W}
  handoff F                deeptwist{period=S_D},train{epochs=F*E},lower-conv-tucker,
                           train{epochs=(1-F)*E,handoff=continue},cleanup
  handoff F + distill      the same with train{distill=W} in both phases
  handoff F -rewind        the factors' phase starts its learning-rate schedule again from the peak
                           (train{handoff=rewind}, learning-rate rewinding) instead of going on with it
  handoff F -ramp          DeepTwist cuts gradually: its ranks fall from full to the target over the first
                           half of its phase (deeptwist{ramp=N}, a cubic schedule as in gradual pruning)
  ... -fit                 factors (and DeepTwist's projections) fitted to each layer's inputs: calibrate on
                           16 training batches first, fit=activation

The teacher of distillation is the pre-trained model (W = 0.5, temperature 4, fixed beforehand: expkit).
Each (arm, ratio, budget, seed) is a resumable run in results/accuracy_recipes/runs/.

    python tools/accuracy_recipes.py --threads 2 --channels-last --eval-every 1   # the grid
    python tools/accuracy_recipes.py --threads 2 --channels-last --eval-every 3 --epochs 30 \
        --only handoff0.5-distill-r6.7-sd50-e30-s0,conventional-distill-r6.7-e30-s0     # the 30-epoch cells
    python tools/accuracy_recipes.py --report-only
    python tools/accuracy_recipes.py --smoke --out /tmp/smoke                       # < 2 minutes
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

import expkit

log = logging.getLogger("accuracy_recipes")

LAYERS = "layer*"
REFERENCE = expkit.REPO / "results" / "deeptwist_vs_tucker" / "runs"

# (arm, ratio, hand-off fraction, period) in the order they run: 6.7x first, where DeepTwist lost
GRID = [(arm, ratio, f, sd) for ratio in (6.7, 4.3)
        for arm, f, sd in (("handoff", 0.67, 50), ("conventional-distill", None, None), ("handoff-distill", 0.67, 50),
                           ("conventional-fit-distill", None, None), ("handoff-fit-distill", 0.67, 50),
                           ("handoff-fit-recal-distill", 0.67, 50),
                           ("handoff", 0.33, 50), ("conventional-fit", None, None),
                           ("handoff-distill", 0.5, 50), ("handoff-distill", 0.33, 50),
                           ("handoff-rewind-distill", 0.33, 50), ("handoff-ramp-distill", 0.67, 50),
                           ("handoff-ramp-distill", 0.33, 50))]
RAMP = 0.5  # -ramp: the share of the DeepTwist phase over which the ranks fall from full to the target


def run_id(arm: str, ratio: float, fraction: float | None, period: int | None, seed: int, epochs: int) -> str:
    handoff = f"{fraction:g}" if fraction is not None else ""
    arm = arm.replace("handoff", f"handoff{handoff}", 1)
    return f"{arm}-r{ratio:g}" + (f"-sd{period}" if period else "") + f"-e{epochs}-s{seed}"


def train_item(budget: expkit.Budget, seed: int, epochs: int, distill: bool, extra: str = "") -> str:
    return budget.train_spec(seed, epochs, (expkit.DISTILLATION if distill else "") + extra)


def pipelines(budget: expkit.Budget, arm: str, ratio: float, fraction: float | None, period: int | None,
              seed: int) -> list[str]:
    distill = arm.endswith("distill")
    fit, calibrate = (",fit=activation", f"calibrate{{batches=16,layers={LAYERS}}},") if "-fit" in arm else ("", "")
    if arm.startswith("conventional"):
        return [f"{calibrate}lower-conv-tucker{{layers={LAYERS},ratio={ratio:g}{fit}}},cleanup",
                train_item(budget, seed, budget.epochs, distill)]
    first = max(1, min(budget.epochs - 1, round(fraction * budget.epochs)))
    recal = "-recal" in arm  # the final projection waits for statistics collected again on the trained network
    handoff = "rewind" if "-rewind" in arm else "continue"  # rewind: the factors' schedule starts at its peak again
    ramp = f",ramp={round(RAMP * first * budget.steps_per_epoch)}" if "-ramp" in arm else ""
    return [f"{calibrate}deeptwist{{layers={LAYERS},ratio={ratio:g},period={period}{fit}{ramp}}},"
            f"{train_item(budget, seed, first, distill, ',finalize=false' if recal else '')},"
            f"{calibrate if recal else ''}lower-conv-tucker,"
            f"{train_item(budget, seed, budget.epochs - first, distill, f',handoff={handoff}')},cleanup"]


def reference_runs(epochs: int) -> dict[tuple[str, float, int], dict]:
    """(arm, ratio, seed) -> the reference run of results/deeptwist_vs_tucker at this budget and lr 0.01:
    "conventional", and "deeptwist" (S_D = 200) and "deeptwist-sd50"."""
    out = {}
    for path in sorted(REFERENCE.glob("*.json")):
        r = json.loads(path.read_text())
        plain = (r["lr"] == 0.01 and not r.get("recalibrate_bn") and not r.get("reset_momentum") and not r.get("late")
                 and not r.get("rectify_bn") and not r.get("target_change") and r["epochs"] == epochs)
        if plain and r["arm"] in ("conventional", "deeptwist"):
            arm = r["arm"] + (f"-sd{r['period']}" if r["arm"] == "deeptwist" and r["period"] != 200 else "")
            out[(arm, r["ratio_requested"], r["seed"])] = r
    return out


def report(store: expkit.RunStore, budget: expkit.Budget) -> None:
    runs = store.load_all()
    if not runs:
        return
    rows, lines, pooled = [], {}, {}
    for epochs in sorted({r["epochs"] for r in runs}):
        refs = reference_runs(epochs)
        mine = [r for r in runs if r["epochs"] == epochs]
        for ratio in sorted({r["ratio_requested"] for r in mine}, reverse=True):
            arms = {(a, s): r for (a, q, s), r in refs.items() if q == ratio}
            arms.update({(r["arm_label"], r["seed"]): r for r in mine if r["ratio_requested"] == ratio})
            for (label, seed), r in sorted(arms.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                conventional = refs.get(("conventional", ratio, seed))
                diff = (expkit.paired_difference([(r, conventional)]) if conventional and r is not conventional
                        else "-")
                distilled = arms.get(("conventional-distill", seed))  # the same distillation, conventionally
                paired = distilled and r is not distilled and label.endswith("distill")
                diff_distilled = expkit.paired_difference([(r, distilled)]) if paired else "-"
                if paired:
                    pooled.setdefault((ratio, epochs, label), []).append((r, distilled))
                after = r.get("evaluations") or []
                rows.append([f"{ratio:g}x", epochs, seed, label, f"{100 * r['test_acc']:.2f}", diff, diff_distilled,
                             f"{r['layers_ratio']:.2f}x", f"{r.get('train_seconds', r['seconds']) / 60:.0f}",
                             f"{100 * r['teacher_seconds'] / r['train_seconds']:.0f}%"
                             if r.get("teacher_seconds") else "-"])
                if after:
                    lines.setdefault((ratio, epochs), []).append((label, seed, r))
    md = ["# Accuracy recipes: hand-off and distillation, CIFAR-10 ResNet-32 (Tucker-2 of the 30 residual 3x3 convs)\n",
          f"Baseline (pre-trained): **{100 * budget.baseline_acc:.2f}%**. Reference arms (conventional, DeepTwist at "
          "S_D = 200 and 50) are the runs of results/deeptwist_vs_tucker at the same budget and seed. "
          "vs conventional: paired bootstrap over the 10,000 test images (10,000 resamples). "
          f"Distillation: weight {expkit.DISTILL:g}, temperature {expkit.TEMPERATURE:g}, teacher = the pre-trained "
          "model; its share of training time is the teacher's forwards.\n",
          expkit.markdown_table(["ratio", "epochs", "seed", "arm", "test acc %", "vs conventional [95% CI]",
                                 "vs conventional-distill", "layers ratio", "train min", "teacher share"], rows),
          "\nSeeds pooled (paired bootstrap over the test images of every seed), against conventional-distill:\n",
          *[f"- {ratio:g}x, {epochs} epochs, {label}: {expkit.paired_difference(pairs)} over {len(pairs)} seeds"
            for (ratio, epochs, label), pairs in sorted(pooled.items()) if len(pairs) > 1],
          "\nCommands that produced these runs (each run's JSON has its own):\n",
          *[f"- `{c}`" for c in sorted({r["command"] for r in runs})], ""]
    (store.root / "results.md").write_text("\n".join(md) + "\n")
    slim = [{k: v for k, v in r.items() if k != "test_correct"} for r in runs]
    (store.root / "results.json").write_text(json.dumps({"runs": slim}, indent=1) + "\n")
    if lines:
        plot_training(lines, store.root / "accuracy_during_training.png")


def plot_training(lines: dict, path: Path) -> None:
    """Test accuracy after each epoch, per arm: DeepTwist phases as trained (solid) and projected to low rank
    (dashed), the factors' phase after the hand-off as trained. Each panel's scale fits the points after
    the first third of its budget, where the arms part; earlier points further down are off the scale."""
    fig, axes = expkit.figure((5.5 * len(lines), 4.6), ncols=len(lines), sharey=False)
    for ax, ((ratio, epochs), runs) in zip(np.atleast_1d(axes), sorted(lines.items())):
        later = [100 * min(x["accuracy"], x.get("low_rank_accuracy") or 1.0)
                 for _, _, r in runs for x in r["evaluations"] if x["epoch"] > epochs / 3]
        top = max(100 * x["accuracy"] for _, _, r in runs for x in r["evaluations"])
        ax.set_ylim(min(later, default=top - 10) - 1.5, top + 1)
        for label, seed, r in runs:
            e = r["evaluations"]
            line, = ax.plot([x["epoch"] for x in e], [100 * x["accuracy"] for x in e], "o-", ms=3,
                            label=f"{label} s{seed}")
            low = [(x["epoch"], 100 * x["low_rank_accuracy"]) for x in e if x.get("low_rank_accuracy") is not None]
            if low:
                ax.plot(*zip(*low), "--", color=line.get_color())
        ax.set_title(f"{ratio:g}x, {epochs} epochs")
        ax.set_xlabel("epoch")
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (%)")
    fig.suptitle("ResNet-32 on CIFAR-10: accuracy during fine-tuning\n(dashed: DeepTwist's network at low rank; "
                 "earlier points below a panel's scale are in runs/*.json)", fontsize=10)
    expkit.save_figure(fig, axes, path)


def main(argv=None) -> int:
    p = expkit.budget_parser(__doc__.split("\n")[0], "accuracy_recipes",
                             smoke_help="tiny budget: each arm once at 4.3x, 2 epochs")
    p.add_argument("--only", help="comma-separated run ids to run (default: the whole grid)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the grid (default 0)")
    args = p.parse_args(argv)
    budget = expkit.budget_of(args)
    if args.smoke:
        budget.epochs = 2
    store = expkit.RunStore(Path(args.out))
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = [(*g, seed, budget.epochs) for seed in seeds for g in GRID]
    if args.smoke:
        grid = [g for g in grid if g[1] == 4.3 and g[2] in (None, 0.67)]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {run_id(*g) for g in grid}
        if unknown:
            p.error(f"--only names runs outside the grid: {', '.join(sorted(unknown))} "
                    f"(it has, e.g., {', '.join(run_id(*g) for g in grid[:3])})")
        grid = [g for g in grid if run_id(*g) in wanted]
    for arm, ratio, fraction, period, seed, epochs in ([] if args.report_only else grid):
        rid = run_id(arm, ratio, fraction, period, seed, epochs)
        if store.done(rid):
            log.info("%s: done earlier, skipped", rid)
            continue
        log.info("%s: running", rid)
        result = expkit.finetune_run(budget, pipelines(budget, arm, ratio, fraction, period, seed), seed,
                                     run_id=rid)
        result.update({"arm": arm, "arm_label": rid.rsplit(f"-r{ratio:g}", 1)[0], "ratio_requested": ratio,
                       "handoff": fraction, "period": period})
        store.save(rid, result, budget.checkpoints)
        log.info("%s: test acc %.2f%% (layers %.2fx) in %.1f min", rid, 100 * result["test_acc"],
                 result["layers_ratio"], result["seconds"] / 60)
        report(store, budget)
    report(store, budget)
    return 0


if __name__ == "__main__":
    sys.exit(expkit.resumable(main))
