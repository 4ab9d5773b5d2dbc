"""DeepTwist vs. conventional Tucker fine-tuning on CIFAR-10 ResNet-32 (Lee et al. 2019, Fig. 4).

Both arms start from the same pre-trained checkpoint and get the same fine-tuning budget (epochs,
SGD with Nesterov momentum, cosine schedule from --lr, batch 128, pad-4 crop + flip, weight decay
5e-4), through twistc's own pipelines:

  conventional: lower-conv-tucker{layers=layer*,ratio=R},cleanup   then  train{...}
  deeptwist:    deeptwist{layers=layer*,ratio=R,period=S_D},train{...},lower-conv-tucker,cleanup

The ratio R is per layer, on weights, over the 30 3x3 convs of the residual stages (the 3->16 stem,
BN and the classifier stay dense); results give both that ratio and the whole model's.
Fine-tuning uses all 50,000 training images, as the checkpoint's training did; no hyper-parameter is
tuned (lr 0.01 was fixed beforehand), so the held-out validation split is not needed here. Accuracy
is on all 10,000 test images. Each (arm, ratio, S_D, seed) is a resumable run written to results/.../runs/.

    python tools/deeptwist_vs_tucker.py                 # the grid, skipping finished runs
    python tools/deeptwist_vs_tucker.py --report-only   # tables and plot from finished runs
    python tools/deeptwist_vs_tucker.py --smoke --out /tmp/smoke   # both arms, tiny, < 1 minute

Investigation options give runs their own ids: --recalibrate-bn N, --reset-momentum, --lr, and for
DeepTwist runs only --late P@N (S_D = P after optimizer step N, a lower S_D late in training),
--rectify-bn N (BatchNorm statistics re-estimated on N batches after every distortion) and
--target-change X (S_D adapted per layer so that a projection removes about X of the kernel), e.g.
    python tools/deeptwist_vs_tucker.py --epochs 30 --threads 2 --late 50@8800 \
        --only deeptwist-r6.7-sd200-e30-late50at8800-s0
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

import expkit

log = logging.getLogger("deeptwist_vs_tucker")

# Paper (arXiv 1905.10145, Fig. 4, read off the figure): ratio -> (DeepTwist, conventional), baseline 92.63
PAPER = {1.6: (92.92, 92.20), 2.1: (92.62, 92.09), 2.8: (92.43, 91.75), 4.3: (91.49, 90.96), 6.7: (90.43, 89.77)}
PAPER_BASELINE = 92.63
LAYERS = "layer*"
DEFAULT_LR = 0.01  # fixed before any run; other values are investigation runs, outside the main table

# (arm, ratio, period, seed) in the order they run: the comparisons that matter most come first.
GRID = (
    [(arm, r, 200, 0) for r in (2.1, 4.3, 6.7) for arm in ("deeptwist", "conventional")]
    + [("finetune", 1.0, 200, 0)]  # control: the dense model, same fine-tuning budget
    + [("deeptwist", 4.3, sd, 0) for sd in (25, 50)] + [("deeptwist", 6.7, 50, 0)]  # S_D = 50 where 200 lost most
    + [(arm, r, 200, 0) for r in (1.6, 2.8) for arm in ("deeptwist", "conventional")]
    + [(arm, r, 200, 1) for r in (2.1, 4.3, 6.7) for arm in ("deeptwist", "conventional")]
)


DEFAULT_EPOCHS = 3


def run_id(arm, ratio, period, seed, variant: str = "") -> str:
    return f"{arm}-r{ratio:g}" + (f"-sd{period}" if arm == "deeptwist" else "") + variant + f"-s{seed}"


def variant(lr: float, bn: int = 0, reset_momentum: bool = False, epochs: int = DEFAULT_EPOCHS,
            late: tuple[int, int] | None = None, rectify: int = 0, target: float | None = None) -> str:
    """The run-id suffix of the investigation options ("" for the grid's own runs)."""
    return ((f"-e{epochs}" if epochs != DEFAULT_EPOCHS else "") + (f"-lr{lr:g}" if lr != DEFAULT_LR else "")
            + (f"-bn{bn}" if bn else "") + ("-mr" if reset_momentum else "")
            + (f"-late{late[0]}at{late[1]}" if late else "") + (f"-rb{rectify}" if rectify else "")
            + (f"-tc{target:g}" if target else ""))


def _late(r: dict) -> tuple[int, int] | None:
    return tuple(r["late"]) if r.get("late") else None


def variant_of(r: dict) -> str:
    return variant(r["lr"], r.get("recalibrate_bn", 0), r.get("reset_momentum", False), r["epochs"], _late(r),
                   r.get("rectify_bn", 0), r.get("target_change"))


def id_of(r: dict) -> str:
    return run_id(r["arm"], r["ratio_requested"], r["period"], r["seed"], variant_of(r))


def pipelines(arm: str, ratio: float, period: int, train: str, late: tuple[int, int] | None = None,
              target: float | None = None) -> list[str]:
    if arm == "finetune":
        return [train]
    if arm == "conventional":
        return [f"lower-conv-tucker{{layers={LAYERS},ratio={ratio:g}}},cleanup", train]
    schedule = (f",late_period={late[0]},late_after={late[1]}" if late else "") + (
        f",target_change={target:g}" if target else "")
    return [f"deeptwist{{layers={LAYERS},ratio={ratio:g},period={period}{schedule}}},{train},lower-conv-tucker,cleanup"]


def run(budget: expkit.Budget, arm: str, ratio: float, period: int, seed: int, bn: int = 0,
        reset_momentum: bool = False, rid: str | None = None, late: tuple[int, int] | None = None,
        rectify: int = 0, target: float | None = None) -> dict:
    train = (budget.train_spec(seed)[:-1] + (f",recalibrate_bn={bn}" if bn else "")
             + (",reset_momentum=true" if reset_momentum else "") + (f",rectify_bn={rectify}" if rectify else "")
             + "}")
    result = expkit.finetune_run(budget, pipelines(arm, ratio, period, train, late, target), seed,
                                 eval_after_first=arm == "conventional", run_id=rid)
    if "test_acc_after_first_pipeline" in result:
        result["test_acc_decomposed"] = result.pop("test_acc_after_first_pipeline")
    return {"arm": arm, "ratio_requested": ratio, "period": period if arm == "deeptwist" else None,
            "recalibrate_bn": bn, "reset_momentum": reset_momentum, "late": list(late) if late else None,
            "rectify_bn": rectify, "target_change": target, **result}


def conventional_pair(r: dict, runs: list[dict]) -> list[tuple[dict, dict]]:
    """A DeepTwist run paired with the conventional run at its ratio, seed and learning rate."""
    if r["arm"] != "deeptwist":
        return []
    return [(r, c) for c in runs if c["arm"] == "conventional" and variant_of(c) == variant(r["lr"], epochs=r["epochs"])
            and (c["ratio_requested"], c["seed"]) == (r["ratio_requested"], r["seed"])]


def options_of(r: dict) -> str:
    """The run's investigation options other than its budget."""
    return variant(r["lr"], r.get("recalibrate_bn", 0), r.get("reset_momentum", False), late=_late(r),
                   rectify=r.get("rectify_bn", 0), target=r.get("target_change"))


def budget_series(runs: list[dict], epochs: int) -> dict:
    """arm -> ratio -> the grid's runs at this budget (no investigation options)."""
    series = {"deeptwist": {}, "conventional": {}, "deeptwist, S_D = 50": {}}
    for r in runs:
        arm = {200: "deeptwist", 50: "deeptwist, S_D = 50"}.get(r["period"]) if r["arm"] == "deeptwist" else r["arm"]
        if r["epochs"] == epochs and not options_of(r) and arm in series:
            series[arm].setdefault(r["ratio_requested"], []).append(r)
    return series


def main_table(series: dict) -> list[list]:
    table = []
    for ratio in sorted(set(series["deeptwist"]) | set(series["conventional"])):
        dt, cv = series["deeptwist"].get(ratio, []), series["conventional"].get(ratio, [])
        dt50 = series["deeptwist, S_D = 50"].get(ratio, [])
        paper = PAPER.get(ratio, ("-", "-"))
        ref = (dt or cv)[0]
        pairs = [(a, b) for a in dt for b in cv if a["seed"] == b["seed"]]
        pairs50 = [(a, b) for a in dt50 for b in cv if a["seed"] == b["seed"]]
        acc = lambda rs: " / ".join(f"{100 * x['test_acc']:.2f}" for x in sorted(rs, key=lambda x: x["seed"])) or "-"
        table.append([f"{ref['layers_ratio']:.2f}x (asked {ratio:g})", f"{ref['model_ratio']:.2f}x", paper[0],
                      paper[1], acc(dt), acc(cv), expkit.paired_difference(pairs), len(pairs) or "-",
                      acc(dt50), expkit.paired_difference(pairs50)])
    return table


def report(store: expkit.RunStore, cfg) -> None:
    runs = store.load_all()
    if not runs:
        return
    baseline = cfg.baseline_acc
    finetuned = [r for r in runs if r["arm"] == "finetune"]
    budgets = sorted({r["epochs"] for r in runs})
    series = budget_series(runs, DEFAULT_EPOCHS if DEFAULT_EPOCHS in budgets else budgets[0])
    header = ["ratio (layers)", "ratio (model)", "paper DT", "paper conv", "ours DT", "ours conv",
              "DT - conv [95% CI]", "paired seeds", "ours DT, S_D = 50", "DT50 - conv [95% CI]"]
    tables = []
    for epochs in budgets:
        steps = next(r["steps_per_epoch"] for r in runs if r["epochs"] == epochs) * epochs
        tables += [f"\n## {epochs} epochs ({steps:,} steps)\n", expkit.markdown_table(header, main_table(
            budget_series(runs, epochs)))]
    sweep = sorted((r for r in runs if r["arm"] == "deeptwist" and r["ratio_requested"] == 4.3
                    and not options_of(r) and r["epochs"] == DEFAULT_EPOCHS),
                   key=lambda r: (r["period"], r["seed"]))
    sweep_rows = [[r["period"], r["seed"], r["distortions"], f"{100 * r['test_acc']:.2f}",
                   expkit.paired_difference(conventional_pair(r, runs))] for r in sweep]
    run_rows = [[id_of(r), f"{100 * r['test_acc']:.2f}", expkit.paired_difference(conventional_pair(r, runs)),
                 f"{100 * r['test_acc_decomposed']:.2f}" if "test_acc_decomposed" in r else "-",
                 f"{100 * r['test_acc_before_final_projection']:.2f}" if r.get("test_acc_before_final_projection")
                 else "-",
                 r["steps"], r["distortions"],
                 "-" if expkit.late_change(r) is None else f"{100 * expkit.late_change(r):.2f}%",
                 f"{r['seconds'] / 60:.1f}"
                 + (f" ({r['train_seconds'] / 3600:.1f} h)" if r.get("train_seconds", 0) > 1.5 * r["seconds"]
                    else ""), expkit.machines(r)] for r in runs]
    change_rows = []
    for r in runs:
        if "projection_change" not in r:
            continue
        row = [id_of(r)]
        for stage in ("layer1", "layer2", "layer3"):
            c = [v for k, v in r["projection_change"].items() if k.startswith(stage + ".")]
            mean = lambda key: sum(v[key] for v in c) / len(c)
            row.append(f"{mean('checkpoint'):.3f}" + (f" -> {mean('final'):.3f}" if c[0]["final"] is not None else ""))
        change_rows.append(row)
    md = ["# DeepTwist vs. conventional Tucker fine-tuning, CIFAR-10 ResNet-32\n",
          f"Baseline (pre-trained checkpoint, all 10,000 JPEG test images): **{100 * baseline:.2f}%** "
          f"(paper: {PAPER_BASELINE}% on the original images with a longer schedule).",
          f"Fine-tuning budget per run: the epochs of each table below, {runs[0]['steps_per_epoch']} steps each, batch "
          f"{runs[0]['batch']} on all 50,000 training images, SGD Nesterov 0.9, cosine from lr {runs[0]['lr']:g} "
          "(fixed beforehand, not tuned), weight decay 5e-4. "
          "Ratio (layers): weight compression of the 30 compressed 3x3 convs; ratio (model): all parameters. "
          "DT - conv: paired bootstrap over test images (10,000 resamples), seeds pooled. S_D = 200.",
          "Control, the dense model fine-tuned with the same budget: "
          + (", ".join(f"{100 * r['test_acc']:.2f}% (seed {r['seed']}, {r['epochs']} epochs)" for r in finetuned)
             or "not run yet") + ".",
          *tables, "\n## S_D sweep at 4.3x\n",
          expkit.markdown_table(["S_D", "seed", "distortions", "test acc %", "vs conventional [95% CI]"],
                                sweep_rows),
          *(["\n## How much of each kernel the projection removes\n",
             "||W - P(W)|| / ||W|| at the run's ranks, mean over each stage's 10 convs: the pre-trained kernel, "
             "and for DeepTwist (->) the kernel at the final projection.\n",
             expkit.markdown_table(["run", "layer1 (16 ch)", "layer2 (32 ch)", "layer3 (64 ch)"], change_rows)]
            if change_rows else []),
          "\n## All runs\n",
          expkit.markdown_table(["run", "test acc %", "vs conventional [95% CI]", "acc right after decomposition %",
                                 "acc before the final projection %", "steps", "distortions",
                                 "kernel change at a distortion, second half of training",
                                 "minutes (a resumed run: its last session, and its whole span incl. pauses)",
                                 "machine"], run_rows),
          "\nCommands that produced these runs (each run's JSON has its own):\n",
          *[f"- `{c}`" for c in sorted({r["command"] for r in runs})], ""]
    (store.root / "results.md").write_text("\n".join(md) + "\n")
    slim = [{k: v for k, v in r.items() if k != "test_correct"} for r in runs]
    (store.root / "results.json").write_text(json.dumps({"baseline_test_acc": baseline, "paper": PAPER,
                                                         "runs": slim}, indent=1) + "\n")
    plot(series, baseline, store.root / "accuracy_vs_ratio.png")
    if len(budgets) > 1:
        plot_budget(runs, store.root / "accuracy_vs_budget.png")
    if any(r.get("evaluations") for r in runs):
        plot_training(runs, store.root / "accuracy_during_training.png")


def plot_training(runs: list[dict], path: Path) -> None:
    """Test accuracy during training (`--eval-every`): as trained, and for DeepTwist also low-rank (every
    projected kernel replaced by its reconstruction, as stopping there would deploy)."""
    evaluated = [r for r in runs if r.get("evaluations")]
    ratios = sorted({r["ratio_requested"] for r in evaluated})
    fig, axes = expkit.figure((5.5 * len(ratios), 4.6), ncols=len(ratios))
    panels = np.atleast_1d(axes)
    for ax, ratio in zip(panels, ratios):
        for r in (r for r in evaluated if r["ratio_requested"] == ratio):
            epochs = [e["epoch"] for e in r["evaluations"]]
            line, = ax.plot(epochs, [100 * e["accuracy"] for e in r["evaluations"]], "o-", ms=3, label=id_of(r))
            low_rank = [100 * e["low_rank_accuracy"] for e in r["evaluations"]
                        if e.get("low_rank_accuracy") is not None]
            if low_rank:
                ax.plot(epochs, low_rank, "--", color=line.get_color(), label="  low-rank")
        ax.set_xlabel("epoch")
        ax.set_title(f"{ratio:g}x")
    panels[0].set_ylabel("test accuracy (%)")
    fig.suptitle("ResNet-32 on CIFAR-10: accuracy during fine-tuning (dashed: DeepTwist's network projected to "
                 "low rank)", fontsize=10)
    expkit.save_figure(fig, axes, path)


def plot_budget(runs: list[dict], path: Path) -> None:
    """Test accuracy against fine-tuning epochs, one line per arm and ratio (seed 0; DeepTwist at a fixed
    S_D and with adaptive S_D), drawn where an arm ran at more than one budget."""
    fig, ax = expkit.figure((6, 4.2))
    lines: dict = {}
    for r in runs:
        if r["seed"] != 0 or options_of(r) not in ("", variant(DEFAULT_LR, target=r.get("target_change"))):
            continue
        label = ("conventional" if r["arm"] == "conventional" else f"DeepTwist, S_D = {r['period']}"
                 + (f" adapted to {r['target_change']:g}" if r.get("target_change") else ""))
        lines.setdefault((label, r["ratio_requested"]), []).append((r["epochs"], 100 * r["test_acc"]))
    budgets = sorted({e for points in lines.values() for e, _ in points})
    for (label, ratio), points in sorted(lines.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if len(points) > 1:
            ax.plot(*zip(*sorted(points)), "s--" if label == "conventional" else "o-", label=f"{label}, {ratio:g}x")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("fine-tuning epochs")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("ResNet-32 on CIFAR-10: accuracy against budget (seed 0)")
    expkit.save_figure(fig, ax, path)


def plot(series, baseline, path: Path) -> None:
    fig, ax = expkit.figure((6, 4.2))
    for arm, style in (("deeptwist", "o-"), ("conventional", "s-"), ("deeptwist, S_D = 50", "^--")):
        points = sorted((np.mean([r["layers_ratio"] for r in rs]), 100 * np.mean([r["test_acc"] for r in rs]))
                        for rs in series[arm].values())
        if points:
            label = {"deeptwist": "DeepTwist, S_D = 200", "deeptwist, S_D = 50": "DeepTwist, S_D = 50"}.get(arm, arm)
            ax.plot(*zip(*points), style, label=f"ours: {label}")
    for i, (arm, style) in enumerate((("DeepTwist", "o:"), ("conventional", "s:"))):
        ax.plot(list(PAPER), [v[i] for v in PAPER.values()], style, alpha=0.4, label=f"paper: {arm}")
    ax.axhline(100 * baseline, ls="--", color="gray", label=f"our baseline {100 * baseline:.2f}%")
    ax.axhline(PAPER_BASELINE, ls="--", color="gray", alpha=0.4, label=f"paper baseline {PAPER_BASELINE}%")
    ax.set_xlabel("compression ratio of the compressed convs (weights)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("ResNet-32 on CIFAR-10: Tucker-2")
    expkit.save_figure(fig, ax, path)


def main(argv=None) -> int:
    p = expkit.budget_parser(__doc__.split("\n")[0], "deeptwist_vs_tucker", lr=DEFAULT_LR,
                             lr_help="other values get -lrX run ids",
                             smoke_help="tiny budget: both arms at 4.3x, period 1")
    p.add_argument("--only", help="comma-separated run ids to run (default: the whole grid)")
    p.add_argument("--recalibrate-bn", type=int, default=0,
                   help="re-estimate BatchNorm statistics on N batches after the final projection (runs get -bnN)")
    p.add_argument("--reset-momentum", action="store_true",
                   help="zero SGD momentum after each distortion (runs get -mr)")
    p.add_argument("--late", type=lambda v: tuple(int(x) for x in v.split("@")), metavar="P@N",
                   help="DeepTwist runs: S_D = P after step N (runs get -latePatN)")
    p.add_argument("--rectify-bn", type=int, default=0,
                   help="DeepTwist runs: re-estimate BatchNorm statistics on N batches after every distortion "
                   "(runs get -rbN)")
    p.add_argument("--target-change", type=float, default=None, metavar="X",
                   help="DeepTwist runs: S_D adapted per layer, from the grid's S_D, so that a projection removes "
                   "about X of a kernel's norm (runs get -tcX)")
    args = p.parse_args(argv)
    cfg = expkit.budget_of(args)
    store = expkit.RunStore(Path(args.out))
    grid = [("deeptwist", 4.3, 1, 0), ("conventional", 4.3, 1, 0)] if args.smoke else GRID
    if args.late or args.rectify_bn or args.target_change:
        grid = [g for g in grid if g[0] == "deeptwist"]
    rid_of = lambda spec: run_id(*spec, variant(args.lr, args.recalibrate_bn, args.reset_momentum, cfg.epochs,
                                                args.late, args.rectify_bn, args.target_change))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {rid_of(g) for g in grid}
        if unknown:
            p.error(f"--only names runs that these options do not make: {', '.join(sorted(unknown))} "
                    f"(they make, e.g., {', '.join(rid_of(g) for g in grid[:3])})")
        grid = [g for g in grid if rid_of(g) in wanted]
    new = 0
    for spec in ([] if args.report_only else grid):
        rid = rid_of(spec)
        if store.done(rid):
            log.info("%s: done earlier, skipped", rid)
            continue
        if args.max_runs is not None and new >= args.max_runs:
            break
        log.info("%s: running", rid)
        result = run(cfg, *spec, args.recalibrate_bn, args.reset_momentum, rid, args.late, args.rectify_bn,
                     args.target_change)
        store.save(rid, result, cfg.checkpoints)
        new += 1
        log.info("%s: test acc %.2f%% (layers %.2fx, model %.2fx) in %.1f min", rid, 100 * result["test_acc"],
                 result["layers_ratio"], result["model_ratio"], result["seconds"] / 60)
        report(store, cfg)
    report(store, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(expkit.resumable(main))
