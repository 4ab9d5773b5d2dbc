"""plan-latency{max_drop=D} on the trained CIFAR-10 ResNet-32: the fastest model within an accuracy drop, untrained.

For each D, twistc plans on the named test slice's first `--plan-images` images (the first 100 test
images of each class, interleaved by class), lowers, folds, and the result is checked on the 9,000
test images outside the slice, which the planner never saw. Every compiled model is then timed with
the dense one round-robin in onnxruntime (CPU, 1 thread, batch 1; the setting it was planned for).
No fine-tuning: this is what a user without training data, or without time to train, gets. Beside
each, plan-latency{speedup=S} at the same predicted speedup (least kernel error, no accuracy
measured) shows what choosing by accuracy gains; with --eval-plan, so does plan-latency{speedup=S,
objective=eval} (per-layer sensitivity on the same images). `--finetune` then fine-tunes the max_drop
and kernel-error plans the usual way (lowered, then 3 epochs of SGD from lr 0.01, cosine;
tools/deeptwist_vs_tucker.py's budget) and checks them on the same 9,000 images. Runs are merged into
results.json by (planning images, D); a rerun that plans the same keeps the earlier fine-tuning and
objective=eval results unless it is asked for them again.

    python tools/accuracy_target.py                                   # D = 0.005, 0.01, 0.02, 0.05
    python tools/accuracy_target.py --drops 0.02 --out /tmp/at        # one target
    python tools/accuracy_target.py --drops 0.02 --plan-images 1000 --finetune   # and after fine-tuning
    python tools/accuracy_target.py --drops 0.02 --plan-images 1000 --eval-plan  # and objective=eval
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

import expkit

from twistc import Pipeline, RunContext, state_of, trace
from twistc.data import cifar10_batches, first_per_class, load_cifar10
from twistc.latency import Runtime, model_timer, paired_medians, paired_speedup
from twistc.models import load_resnet32

log = logging.getLogger("accuracy_target")
LOWER = "lower,fold,cleanup"
RUNTIME = Runtime("ort", "cpu", threads=1, batch=1)


def interleaved_slice(labels: np.ndarray, per_class: int = 100) -> np.ndarray:
    """The slice's indices ordered class by class in turn, so that any prefix is balanced."""
    picked = first_per_class(labels, per_class)
    by_class = [picked[labels[picked] == c] for c in np.unique(labels)]
    return np.stack(by_class, axis=1).reshape(-1)


def compile_plan(model: torch.nn.Module, target: str, plan_batches: list, cache: str) -> tuple:
    spec = f"plan-latency{{{target},eval_batches={len(plan_batches)},threads=1,batch=1,cache={cache}}},{LOWER}"
    start = time.perf_counter()
    gm = Pipeline.parse(spec).run(trace(model, (torch.randn(1, 3, 32, 32),)),
                                  RunContext(eval_data=lambda: plan_batches))
    state = state_of(gm)
    layers = list(state.layers.values())
    return gm, {"spec": spec, "seconds": time.perf_counter() - start,
                "compressed": sum(1 for r in layers if r.lowering), "layers": len(layers),
                "forms": {f: sum(1 for r in layers if r.lowering == f) for f in {r.lowering for r in layers} if f},
                "weight_ratio": sum(r.before.params for r in layers) / sum(r.current.params for r in layers),
                "mac_ratio": sum(r.before.macs for r in layers) / sum(r.current.macs for r in layers),
                "predicted_speedup": state.latency["predicted_speedup"],
                "plan_drop": state.latency.get("accuracy_drop"), "plan": state.plan.to_json()}


def finetuned(budget: expkit.Budget, plan: dict, held_out: np.ndarray) -> dict:
    """The plan lowered, fine-tuned the usual way, and its accuracy on the held-out test images."""
    run = expkit.finetune_run(budget, ["lower,cleanup",
                                       budget.train_spec(0)], seed=0, plan=plan)
    correct = expkit.unpack_bools(run["test_correct"], run["test_n"])[held_out]
    return {"held_out_accuracy": float(correct.mean()), "held_out_correct": expkit.pack_bools(correct),
            "train_seconds": run["train_seconds"]}


def _interval(value: float, ci: list[float], fmt: str) -> str:
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _tuned_row(r: dict) -> list:
    a, b = (expkit.unpack_bools(r["finetuned"][k]["held_out_correct"], r["held_out_images"])
            for k in ("max_drop", "kernel"))
    diff, lo, hi = (100 * x for x in expkit.paired_bootstrap(a, b))
    return [f"{r['max_drop']:.1%}", r["plan_images"], f"{r['speedup']:.2f}", f"{a.mean():.2%}", f"{b.mean():.2%}",
            f"{diff:+.2f} [{lo:+.2f}, {hi:+.2f}]"]


def plot(runs: list[dict], path: Path) -> None:
    """Held-out accuracy against predicted speedup, before fine-tuning: max_drop, kernel-error and objective=eval
    plans."""
    fig, ax = expkit.figure()
    for color, images in zip(("C0", "C1", "C2", "C3"), sorted({r["plan_images"] for r in runs})):
        mine = sorted((r for r in runs if r["plan_images"] == images), key=lambda r: r["predicted_speedup"])
        x = [r["predicted_speedup"] for r in mine]
        ax.plot(x, [100 * r["held_out_accuracy"] for r in mine], "o-", color=color,
                label=f"max_drop, planned on {images} images")
        ax.plot(x, [100 * r["kernel_plan"]["held_out_accuracy"] for r in mine], "x--", color=color,
                label="least kernel error at the same speedup")
        evaluated = [r for r in mine if "eval_plan" in r]
        if evaluated:
            ax.plot([r["predicted_speedup"] for r in evaluated],
                    [100 * r["eval_plan"]["held_out_accuracy"] for r in evaluated], "s:", color=color,
                    label="objective=eval at the same speedup")
    ax.axhline(100 * runs[0]["dense_held_out_accuracy"], color="gray", ls=":", label="dense")
    ax.set_xlabel("predicted speedup (onnxruntime CPU, 1 thread, batch 1)")
    ax.set_ylabel("accuracy on the 9,000 held-out test images (%)")
    ax.set_title("ResNet-32 on CIFAR-10, without fine-tuning")
    expkit.save_figure(fig, ax, path)


def report(runs: list[dict], out: Path) -> None:
    runs = sorted(runs, key=lambda r: (r["plan_images"], r["max_drop"]))
    rows = [[f"{r['max_drop']:.1%}", r["plan_images"], f"{r['plan_drop']['measured']:.2%}",
             _interval(r["held_out_drop"], r["held_out_drop_ci95"], ".2%"), f"{r['held_out_accuracy']:.2%}",
             f"{r['kernel_plan']['held_out_accuracy']:.2%}",
             f"{r['eval_plan']['held_out_accuracy']:.2%}" if "eval_plan" in r else "-",
             _interval(r["speedup"], r["speedup_ci95"], ".2f"),
             f"{r['predicted_speedup']:.2f}", f"{r['mac_ratio']:.2f}", f"{r['weight_ratio']:.2f}",
             f"{r['compressed']}/{r['layers']}", f"{r['seconds'] / 60:.1f}"] for r in runs]
    tuned = [r for r in runs if "finetuned" in r]
    first = runs[0]
    commands = sorted({r["command"] for r in runs} | {r[k]["command"] for k in ("finetuned", "eval_plan")
                                                       for r in runs if "command" in r.get(k, {})})
    text = ["# plan-latency{max_drop=D}: the fastest ResNet-32 within an accuracy drop", "",
            f"Commands: {', '.join(f'`{c}`' for c in commands)} (planning images from the test slice, held-out "
            f"check on {first['held_out_images']:,} other test images; dense held-out accuracy "
            f"{first['dense_held_out_accuracy']:.2%}; onnxruntime CPU, 1 thread, batch 1, {first['reps']} paired "
            "repetitions; machine and versions in results.json).", "",
            expkit.markdown_table(["max_drop", "planning images", "drop on them", "drop on held-out images "
                                   "[95% CI]", "held-out accuracy", "kernel-error plan at the same predicted "
                                   "speedup: held-out accuracy", "objective=eval plan, same: held-out accuracy",
                                   "measured speedup [95% CI]", "predicted", "MAC cut",
                                   "weight cut", "layers compressed", "compile (min)"], rows), ""]
    if tuned:
        text += ["After fine-tuning both plans the same way (lowered, 3 epochs, SGD from lr 0.01, cosine), on the "
                 "same held-out images (difference: max_drop plan minus kernel-error plan, paired bootstrap):", "",
                 expkit.markdown_table(["max_drop", "planning images", "measured speedup", "max_drop plan",
                                        "kernel-error plan", "difference (points) [95% CI]"],
                                       [_tuned_row(r) for r in tuned]), ""]
    text += ["![held-out accuracy against predicted speedup](accuracy_vs_speedup.png)", ""]
    plot(runs, out / "accuracy_vs_speedup.png")
    (out / "results.md").write_text("\n".join(text))
    (out / "results.json").write_text(json.dumps(runs, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--drops", default="0.005,0.01,0.02,0.05")
    p.add_argument("--plan-images", default="500", help="planning images from the slice (batches of 250), "
                   "comma-separated for several")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2, help="torch threads for planning's evaluations")
    p.add_argument("--data", default=str(expkit.SHARED_DATA / "cifar10-jpg.tar.gz"))
    p.add_argument("--checkpoint", default=str(expkit.SHARED_DATA / "resnet32_cifar10.pt"))
    p.add_argument("--latency-cache", default=str(expkit.CHECKPOINTS.parent / "latency.json"))
    p.add_argument("--out", default=str(expkit.REPO / "results" / "accuracy_target"))
    p.add_argument("--finetune", action="store_true", help="also fine-tune both plans (3 epochs) and check them")
    p.add_argument("--eval-plan", action="store_true", help="also plan-latency{speedup=S,objective=eval} at the "
                   "same predicted speedup (least summed per-layer output divergence)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, labels = load_cifar10(args.data, "test")
    held_out = np.setdiff1d(np.arange(len(labels)), first_per_class(labels, 100))
    check = list(cifar10_batches(args.data, "test", batch_size=500, subset=held_out))
    model = load_resnet32(Path(args.checkpoint)).eval()
    dense_correct = expkit.correctness(model, check)
    earlier = out / "results.json"
    runs = json.loads(earlier.read_text()) if earlier.exists() else []
    budget = expkit.Budget(args.data, args.checkpoint, channels_last=True)
    for images, drop in itertools.product((int(n) for n in args.plan_images.split(",")),
                                          (float(d) for d in args.drops.split(","))):
        planning = interleaved_slice(labels)[:images]
        plan_batches = list(cifar10_batches(args.data, "test", batch_size=250, subset=planning))
        torch.set_num_threads(args.threads)
        log.info("max_drop %g on %d images", drop, images)
        gm, info = compile_plan(model, f"max_drop={drop:g}", plan_batches, args.latency_cache)
        correct = expkit.correctness(gm.eval(), check)
        kernel_gm, kernel = compile_plan(model, f"speedup={info['predicted_speedup']:.4f}", plan_batches,
                                         args.latency_cache)
        kernel["held_out_accuracy"] = float(expkit.correctness(kernel_gm.eval(), check).mean())
        if args.eval_plan:
            eval_gm, by_eval = compile_plan(model, f"speedup={info['predicted_speedup']:.4f},objective=eval",
                                            plan_batches, args.latency_cache)
            by_eval["held_out_accuracy"] = float(expkit.correctness(eval_gm.eval(), check).mean())
        torch.set_num_threads(RUNTIME.threads)
        x = torch.randn(1, 3, 32, 32)
        samples: list[list[float]] = []
        medians = paired_medians([model_timer(model, x, RUNTIME), model_timer(gm, x, RUNTIME)], warmup=5,
                                 reps=args.reps, samples=samples)
        before = [r for r in runs if (r["plan_images"], r["max_drop"]) == (images, drop)]
        runs = [r for r in runs if r not in before]
        runs.append({**info, "max_drop": drop, "plan_images": len(planning), "held_out_images": len(held_out),
                     "dense_held_out_accuracy": float(dense_correct.mean()),
                     "held_out_accuracy": float(correct.mean()),
                     "held_out_drop": float(dense_correct.mean() - correct.mean()),
                     "held_out_drop_ci95": list(expkit.paired_bootstrap(dense_correct, correct)[1:]),
                     "dense_ms": medians[0], "compiled_ms": medians[1], "speedup": medians[0] / medians[1],
                     "speedup_ci95": paired_speedup(samples[0], samples[1])[1], "reps": args.reps,
                     "kernel_plan": kernel, **({"eval_plan": by_eval} if args.eval_plan else {}),
                     **expkit.metadata()})
        log.info("max_drop %g: planned drop %.2f%%, held-out drop %.2f%%, %.2fx measured", drop,
                 100 * info["plan_drop"]["measured"], 100 * runs[-1]["held_out_drop"], runs[-1]["speedup"])
        plans = json.loads(json.dumps([info["plan"], kernel["plan"]]))  # as results.json holds them
        same_plans = [r for r in before if [r.get("plan"), r["kernel_plan"].get("plan")] == plans]
        for key, asked in (("finetuned", args.finetune), ("eval_plan", args.eval_plan)):
            if same_plans and key in same_plans[0] and not asked:  # still what those plans scored
                runs[-1][key] = {"command": same_plans[0]["command"], **same_plans[0][key]}
        if args.finetune:
            torch.set_num_threads(args.threads)
            runs[-1]["finetuned"] = {"max_drop": finetuned(budget, info["plan"], held_out),
                                     "kernel": finetuned(budget, kernel["plan"], held_out),
                                     "command": runs[-1]["command"]}
        report(runs, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
