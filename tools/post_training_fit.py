"""Post-training compression (no fine-tuning): factors fitted to the kernel vs. to each layer's inputs.

CIFAR-10 ResNet-32: the 30 3x3 convs of the residual stages lowered to Tucker-2 chains at a per-layer
weight ratio, with `fit=weight` (HOOI of the kernel) or `fit=activation` (calibrate on `--calib-batches`
training batches of 128 augmented images, then factors that minimise each layer's output error on
them); accuracy on all 10,000 test images, and the paired difference between the two fits.

    python tools/post_training_fit.py --threads 2          # ratios 2 and 4, both fits
    python tools/post_training_fit.py --report-only
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import expkit

RATIOS = (2.0, 4.0)
FITS = ("weight", "activation")


def run_id(ratio: float, fit: str, batches: int) -> str:
    return f"tucker-r{ratio:g}-{fit}" + (f"-calib{batches}" if fit == "activation" else "")


def pipeline(ratio: float, fit: str, batches: int) -> str:
    lower = f"lower-conv-tucker{{layers=layer*,ratio={ratio:g},fit={fit}}},cleanup"
    return (f"calibrate{{batches={batches},layers=layer*}}," if fit == "activation" else "") + lower


def report(store: expkit.RunStore, budget: expkit.Budget) -> None:
    runs = {r["run_id"]: r for r in store.load_all()}
    if not runs:
        return
    baseline = budget.baseline_acc
    rows = []
    for r in sorted(runs.values(), key=lambda r: (r["ratio_requested"], r["fit"] != "weight")):
        kernel = runs.get(run_id(r["ratio_requested"], "weight", 0))
        drop = baseline - r["test_acc"]
        rows.append([f"{r['layers_ratio']:.2f}x (asked {r['ratio_requested']:g})", r["fit"],
                     r.get("calib_batches") or "-", f"{100 * r['test_acc']:.2f}", f"{100 * drop:.2f}",
                     f"{drop / (baseline - kernel['test_acc']):.2f}" if kernel and r is not kernel else "-",
                     expkit.paired_difference([(r, kernel)]) if kernel and r is not kernel else "-",
                     f"{r['seconds']:.0f}"])
    md = ["# Post-training Tucker-2 of CIFAR-10 ResNet-32: kernel fit vs. data-aware fit\n",
          f"No fine-tuning. Baseline (pre-trained, 10,000 test images): **{100 * baseline:.2f}%**. The 30 3x3 convs "
          "of the residual stages at the given per-layer weight ratio; the stem and the classifier stay dense. "
          "Drop share: this fit's accuracy drop over the kernel fit's (the goal: at most 0.5 at 2x). "
          "vs kernel fit: paired bootstrap over the test images (10,000 resamples).\n",
          expkit.markdown_table(["ratio (layers)", "fit", "calibration batches", "test acc %", "drop (points)",
                                 "drop share", "vs kernel fit [95% CI]", "seconds"], rows),
          "\nCommands:\n", *[f"- `{c}`" for c in sorted({r["command"] for r in runs.values()})], ""]
    (store.root / "results.md").write_text("\n".join(md) + "\n")
    slim = [{k: v for k, v in r.items() if k != "test_correct"} for r in runs.values()]
    (store.root / "results.json").write_text(json.dumps({"baseline_test_acc": baseline, "runs": slim}, indent=1)
                                             + "\n")


def main(argv=None) -> int:
    p = expkit.budget_parser(__doc__.split("\n")[0], "post_training_fit", smoke_help="200 test images, 2x only")
    p.add_argument("--calib-batches", type=int, default=16, help="training batches calibrate collects on (16)")
    args = p.parse_args(argv)
    budget = expkit.budget_of(args)
    budget.epochs = 0
    store = expkit.RunStore(Path(args.out))
    for ratio in (RATIOS[:1] if args.smoke else RATIOS):
        for fit in ([] if args.report_only else FITS):
            rid = run_id(ratio, fit, args.calib_batches)
            if store.done(rid):
                continue
            result = expkit.finetune_run(budget, [pipeline(ratio, fit, args.calib_batches)], seed=0)
            result.update({"run_id": rid, "ratio_requested": ratio, "fit": fit,
                           "calib_batches": args.calib_batches if fit == "activation" else None})
            store.save(rid, result)
            print(f"{rid}: {100 * result['test_acc']:.2f}% in {result['seconds']:.0f} s", flush=True)
    report(store, budget)
    return 0


if __name__ == "__main__":
    sys.exit(expkit.resumable(main))
