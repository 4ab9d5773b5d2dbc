"""Latency-aware compilation (plan-latency) against uniform Tucker ranks, measured in onnxruntime or PyTorch.

For each model and setting (where it is timed: runtime, device, threads, batch) it compiles the
variants below with twistc's own pipelines, plans for that setting, and times all of them with the
dense model round-robin in one process (median over repetitions after warm-up; speedup = dense
median / variant median, with a bootstrap 95% CI of the per-repetition ratios). It reports measured
and predicted speedup, the weight and MAC cuts, and the approximation error: sqrt(sum over convs of
||W - W_r||^2 / ||W||^2), with W_r the kernel the lowered form computes.

  uniform r=2, r=4        lower-conv-tucker{ratio=R},fold,cleanup (1x1 convs stay dense)
  plan macs=M             plan-latency{macs=M}: the MAC cut of uniform r=2's Tucker ranks (before fold,
                          whose exact merges add to it a little), spent where it is fastest
  plan 1.25x, 1.5x, 2x    plan-latency{speedup=S}

ResNet-32 carries the trained CIFAR-10 checkpoint; ResNet-18/50 (224x224) are randomly initialised
(latency does not depend on the values; their errors only compare variants of one model).

`--finetune` then fine-tunes ResNet-32's variants (planned for batch 1, 1 thread) on CIFAR-10 with
the usual budget (3 epochs, SGD from lr 0.01, cosine; tools/deeptwist_vs_tucker.py's) and reports
test accuracy: conventionally (decompose, then train) and, for the plans, with DeepTwist
(S_D = 50) under the same plan.

    python tools/latency_plan.py                                # all models and settings, skipping finished
    python tools/latency_plan.py --models resnet32 --settings b1t1 --reps 10 --out /tmp/lp   # quick
    python tools/latency_plan.py --settings cuda-b1,cuda-b32    # on a GPU: PyTorch eager on CUDA
    python tools/latency_plan.py --finetune --threads 1         # ResNet-32 accuracy after fine-tuning
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

import expkit

from twistc import Pipeline, state_of, trace
from twistc.latency import Runtime, model_timer, paired_medians, paired_speedup
from twistc.models import load_resnet32, resnet18, resnet50

log = logging.getLogger("latency_plan")

MODELS = {
    "resnet32": (lambda ckpt: load_resnet32(ckpt), (1, 3, 32, 32)),
    "resnet18": (lambda ckpt: resnet18(), (1, 3, 224, 224)),
    "resnet50": (lambda ckpt: resnet50(), (1, 3, 224, 224)),
}
SETTINGS = {"b1t1": Runtime("ort", "cpu", threads=1, batch=1), "b8t2": Runtime("ort", "cpu", threads=2, batch=8),
            "cuda-b1": Runtime("torch", "cuda", batch=1), "cuda-b32": Runtime("torch", "cuda", batch=32)}
TARGETS = (1.25, 1.5, 2.0)
LOWER = "lower,fold,cleanup"


def variants(macs_of_r2: float, runtime: Runtime, cache: str) -> dict[str, str]:
    plan = (f"runtime={runtime.runtime},device={runtime.device},threads={runtime.threads},batch={runtime.batch},"
            f"cache={cache}")
    out = {f"uniform r={r}": f"lower-conv-tucker{{ratio={r}}},fold,cleanup" for r in (2, 4)}
    out[f"plan macs={macs_of_r2:.2f}"] = f"plan-latency{{macs={macs_of_r2:.4f},{plan}}},{LOWER}"
    out.update({f"plan {s:g}x": f"plan-latency{{speedup={s:g},{plan}}},{LOWER}" for s in TARGETS})
    return out


@torch.no_grad()
def approximation_error(original: torch.nn.Module, state) -> float:
    """sqrt(sum over lowered convs of ||W - W_r||^2 / ||W||^2), W_r from the plan's own reconstruction."""
    total = 0.0
    for name, record in state.layers.items():
        if record.lowering:
            w = original.get_parameter(f"{name}.weight")
            total += float(state.plan.get(name).project(w)[1]) ** 2
    return total ** 0.5


def compile_variant(model: torch.nn.Module, x: torch.Tensor, spec: str) -> tuple[torch.nn.Module, dict]:
    start = time.perf_counter()
    gm = Pipeline.parse(spec).run(trace(model, (x,)))
    state = state_of(gm)
    layers = [r for r in state.layers.values()]
    before = sum(r.before.params for r in layers), sum(r.before.macs for r in layers)
    after = sum(r.current.params for r in layers), sum(r.current.macs for r in layers)
    info = {"spec": spec, "compile_seconds": time.perf_counter() - start,
            "compressed": sum(1 for r in layers if r.lowering), "convs": len(layers),
            "weight_ratio": before[0] / after[0], "mac_ratio": before[1] / after[1],
            "forms": {f: sum(1 for r in layers if r.lowering == f) for f in ("tucker-chain", "svd-conv")},
            "error": approximation_error(model, state), "plan": state.plan.to_json()}
    if state.latency:
        info["predicted_speedup"] = state.latency["predicted_speedup"]
    return gm, info


def run(model_name: str, setting: str, checkpoint: str, reps: int, cache: str) -> dict:
    runtime = SETTINGS[setting]
    torch.set_num_threads(runtime.threads)
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = build(checkpoint).eval()
    x = torch.randn(*shape)
    _, r2 = compile_variant(model, x, "lower-conv-tucker{ratio=2},cleanup")
    results, modules = {}, {"dense": model}
    for label, spec in variants(r2["mac_ratio"], runtime, cache).items():
        log.info("%s %s: %s", model_name, setting, label)
        try:
            modules[label], results[label] = compile_variant(model, x, spec)
        except Exception as e:  # an unreachable target is a result too
            results[label] = {"spec": spec, "failed": f"{type(e).__name__}: {e}"}
    timers = [model_timer(m.eval(), x, runtime) for m in modules.values()]
    samples: list[list[float]] = []
    medians = paired_medians(timers, warmup=5, reps=reps, samples=samples)
    for (label, _), median, s in zip(list(modules.items())[1:], medians[1:], samples[1:]):
        results[label].update({"median_ms": median, "speedup": medians[0] / median,
                               "speedup_ci95": paired_speedup(samples[0], s)[1]})
    return {"model": model_name, "setting": setting, "runtime": runtime.to_json(), "batch": runtime.batch,
            "threads": runtime.threads, "reps": reps,
            "dense_median_ms": medians[0], "variants": results, **expkit.metadata()}


FINETUNE = ("uniform r=2", "plan macs=", "plan 1.5x")  # the ResNet-32 b1t1 variants fine-tuned
# (arm, the arm it is compared with under the same plan): DeepTwist and distillation against conventional
# fine-tuning, the hand-off with distillation against conventional fine-tuning with the same distillation
REFERENCES = (("-deeptwist-", "-conventional-"), ("-handoff-distill-", "-conventional-distill-"),
              ("-conventional-distill-", "-conventional-"))


def finetune_specs(store: expkit.RunStore, budget: expkit.Budget,
                   seed: int) -> dict[str, tuple[list[str], dict | None]]:
    """run id -> (pipelines, plan) for the ResNet-32 b1t1 variants: conventional, and DeepTwist under each
    plan; under the 1.5x plan also the recipes of results/accuracy_recipes, each with distillation:
    conventional, and the hand-off after two thirds of the epochs. Plans are the ones benchmarked, fed back
    as they are (re-planning would re-time the model)."""
    timed = json.loads(store.path("resnet32-b1t1").read_text())
    train = budget.train_spec(seed)
    out = {}
    unfolded = lambda spec: spec.replace(",fold", "")  # BatchNorm trains; folding it (exact) waits for the end
    for label, v in timed["variants"].items():
        if not label.startswith(FINETUNE) or "failed" in v:
            continue
        key = label.replace(" ", "").replace("=", "")
        if label.startswith("plan"):
            out[f"finetune-conventional-{key}"] = ([unfolded(LOWER), train], v["plan"])
            out[f"finetune-deeptwist-{key}"] = ([f"deeptwist{{period=50}},{train},{LOWER}"], v["plan"])
        else:
            out[f"finetune-conventional-{key}"] = ([unfolded(v["spec"]), train], None)
        if label == "plan 1.5x":
            first = round(2 * budget.epochs / 3)
            out[f"finetune-conventional-distill-{key}"] = (
                [unfolded(LOWER), budget.train_spec(seed, extra=expkit.DISTILLATION)], v["plan"])
            out[f"finetune-handoff-distill-{key}"] = (
                [f"deeptwist{{period=50}},{budget.train_spec(seed, first, expkit.DISTILLATION)},lower,"
                 f"{budget.train_spec(seed, budget.epochs - first, expkit.DISTILLATION + ',handoff=continue')},cleanup"],
                v["plan"])
    return dict(sorted(out.items(), key=lambda kv: "deeptwist" in kv[0]))  # the conventional runs first


def finetune(budget: expkit.Budget, store: expkit.RunStore, seed: int = 0) -> None:
    for rid, (specs, plan) in finetune_specs(store, budget, seed).items():
        if store.done(rid):
            continue
        log.info("%s: %s", rid, " then ".join(specs))
        result = expkit.finetune_run(budget, specs, seed, run_id=rid, plan=plan)
        store.save(rid, {"run": rid, **result}, budget.checkpoints)
        report(store)


def finetune_rows(runs: list[dict]) -> list[list]:
    tuned = sorted((r for r in runs if r.get("run", "").startswith("finetune-")), key=lambda r: r["run"])
    by_id = {r["run"]: r for r in tuned}
    uniform = by_id.get("finetune-conventional-uniformr2")

    def reference(r):  # the run under the same plan that `r` is compared with
        for arm, other in REFERENCES:
            if arm in r["run"]:
                return by_id.get(r["run"].replace(arm, other))
        return None

    return [[r["run"].removeprefix("finetune-"), f"{100 * r['test_acc']:.2f}",
             expkit.paired_difference([(r, uniform)]) if uniform and r is not uniform else "-",
             f"{reference(r)['run'].removeprefix('finetune-')}: {expkit.paired_difference([(r, reference(r))])}"
             if reference(r) else "-",
             f"{r['layers_ratio']:.2f}x", r["steps"], r["distortions"], f"{r['seconds'] / 60:.0f}"] for r in tuned]


def report(store: expkit.RunStore) -> None:
    runs = [r for r in store.load_all() if "variants" in r]
    tuned = finetune_rows(store.load_all())
    if not runs:
        return
    header = ["model", "setting", "variant", "measured speedup [95% CI]", "predicted", "weights cut", "MACs cut",
              "error", "compressed / layers (tucker, svd)"]
    rows = []
    for r in sorted(runs, key=lambda r: (list(MODELS).index(r["model"]), r["setting"])):
        rows.append([r["model"], r["setting"], "dense", f"1 ({r['dense_median_ms']:.2f} ms)", "", "", "", "0", ""])
        for label, v in r["variants"].items():
            if "failed" in v:
                why = v["failed"].removeprefix("RankError: plan-latency: ").split("; ask for less")[0]
                rows.append([r["model"], r["setting"], label, "not compiled: " + why, "", "", "", "", ""])
                continue
            lo, hi = v["speedup_ci95"]
            rows.append([r["model"], r["setting"], label, f"{v['speedup']:.2f} [{lo:.2f}, {hi:.2f}]",
                         f"{v['predicted_speedup']:.2f}" if "predicted_speedup" in v else "-",
                         f"{v['weight_ratio']:.2f}x", f"{v['mac_ratio']:.2f}x", f"{v['error']:.3f}",
                         f"{v['compressed']} / {v['convs']} ({v['forms']['tucker-chain']}, {v['forms']['svd-conv']})"])
    md = ["# Latency-aware compilation against uniform Tucker ranks\n",
          "Every variant is planned for its setting and timed with the dense model round-robin in one process. "
          "Settings: " + "; ".join(f"{name}: {setting_text(rt)}" for name, rt in SETTINGS.items()
                                   if any(r["setting"] == name for r in runs))
          + ". Error: sqrt of the summed squared relative kernel errors of the lowered layers. ResNet-18/50 have "
          "random weights.\n",
          expkit.markdown_table(header, rows), "",
          *(["## ResNet-32 after fine-tuning (plans for batch 1, 1 thread)\n",
             "3 epochs on CIFAR-10 from the checkpoint (88.83%), SGD Nesterov from lr 0.01, cosine, seed 0; test "
             "accuracy on all 10,000 test images. DeepTwist: S_D = 50 under the same plan; the hand-off: "
             "DeepTwist for two thirds of the epochs, then the factors on the same schedule; distillation from "
             f"the pre-trained model (weight {expkit.DISTILL:g}, temperature {expkit.TEMPERATURE:g}).\n",
             expkit.markdown_table(["run", "test acc %", "vs uniform r=2 [95% CI]",
                                    "vs the same plan's reference [95% CI]", "weights cut (compressed convs)",
                                    "steps", "distortions", "minutes"], tuned), ""] if tuned else []),
          "Machines and commands:", ""]
    md += sorted({f"- `{r['command']}` on {r.get('runtime', {}).get('machine') or r['machine']['cpu']}"
                  for r in store.load_all()}) + [""]
    (store.root / "results.md").write_text("\n".join(md))
    (store.root / "results.json").write_text(json.dumps(runs, indent=1) + "\n")
    plot(runs, store.root / "predicted_vs_measured.png")


def setting_text(runtime: Runtime) -> str:
    if runtime.runtime == "ort":
        threads = f"{runtime.threads} thread{'s' * (runtime.threads > 1)}"
        return f"onnxruntime ({runtime.device.upper()} execution provider), batch {runtime.batch}, {threads}"
    engine = "eager" if runtime.runtime == "torch" else "under torch.compile"
    return f"PyTorch {engine} on {runtime.device.upper()}, batch {runtime.batch}"


def plot(runs: list[dict], path: Path) -> None:
    fig, ax = expkit.figure((5, 4.5))
    for r in runs:
        points = [(v["predicted_speedup"], v["speedup"]) for v in r["variants"].values()
                  if "predicted_speedup" in v and "speedup" in v]
        if points:
            ax.plot(*zip(*points), "o", label=f"{r['model']} {r['setting']}")
    top = max([2.2] + [v.get("speedup", 0) for r in runs for v in r["variants"].values()])
    ax.plot([0.8, top], [0.8, top], "k--", lw=0.8, label="measured = predicted")
    ax.fill_between([0.8, top], [0.72, 0.9 * top], [0.88, 1.1 * top], color="gray", alpha=0.15, label="within 10%")
    ax.set_xlabel("predicted speedup (plan-latency)")
    ax.set_ylabel("measured speedup")
    expkit.save_figure(fig, ax, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--settings", default=",".join(s for s, r in SETTINGS.items() if r.device == "cpu"),
                   help=f"of {', '.join(SETTINGS)} (default: %(default)s)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--checkpoint", default=str(expkit.SHARED_DATA / "resnet32_cifar10.pt"))
    p.add_argument("--latency-cache", default=str(expkit.CHECKPOINTS.parent / "latency.json"))
    p.add_argument("--out", default=str(expkit.REPO / "results" / "latency_plan"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--finetune", action="store_true", help="fine-tune ResNet-32's variants on CIFAR-10 (see above)")
    p.add_argument("--data", default=str(expkit.SHARED_DATA / "cifar10-jpg.tar.gz"))
    p.add_argument("--threads", type=int, default=2, help="torch threads of --finetune")
    args = p.parse_args(argv)
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            p.error(f"unknown setting {setting!r}; the settings are {', '.join(SETTINGS)}")
        if SETTINGS[setting].device == "cuda" and not torch.cuda.is_available():
            p.error(f"setting {setting} times on CUDA, and this torch sees no GPU; leave it out here")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    store = expkit.RunStore(Path(args.out))
    if args.finetune and not args.report_only:
        torch.set_num_threads(args.threads)
        finetune(expkit.Budget(args.data, args.checkpoint, checkpoints=str(expkit.CHECKPOINTS / "latency_plan")), store)
        report(store)
        return 0
    for model in ([] if args.report_only else args.models.split(",")):
        for setting in args.settings.split(","):
            rid = f"{model}-{setting}"
            if store.done(rid):
                log.info("%s: done earlier, skipped", rid)
                continue
            store.save(rid, run(model, setting, args.checkpoint, args.reps, args.latency_cache))
            report(store)
    report(store)
    return 0


if __name__ == "__main__":
    sys.exit(expkit.resumable(main))
