"""Accuracy recipes on the digits transformer: data-aware factors, distillation and the DeepTwist hand-off.

The model is examples/digits_transformer.py (trained from scratch, evaluated on its 360 held-out
images). Its attention and MLP Linears are cut 2x in weights by SVD (the 2x2 patch embedding, a
stem, keeps all it reads, and the classifier head a rank per class: both stay dense), then fine-tuned with
AdamW for 15 epochs (675 steps), cosine decay from lr 0.01 with warmup over the first 67 steps and
gradient clipping at 1 (the best conventional setting of results/transformer_recipe), seeds 0-2:

  conventional   lower-conv-svd{ratio=2},lower-linear-svd{ratio=2},train,fold,cleanup
  deeptwist      deeptwist{decomp=svd,ratio=2,period=2},train,lower-conv-svd,lower-linear-svd,fold,cleanup
  handoff        deeptwist{...},train{epochs=10},lower-...,train{epochs=5,handoff=continue},fold,cleanup

each with factors fitted to the kernel or to the layers' inputs (`+fit`: calibrate on 16 training
batches first), and with distillation from the dense model (`+distill`: weight 0.5, temperature 4).
`post-training` arms lower without any fine-tuning; `dense` fine-tunes the uncompressed model the same
way, the reference for what the extra epochs alone give. Each run is one file under
results/transformer_accuracy/runs/; reruns skip them.

    python tools/transformer_accuracy.py --threads 1
    python tools/transformer_accuracy.py --report-only
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

MODEL_FILE = expkit.REPO / "examples" / "digits_transformer.py"
EPOCHS, HANDOFF_EPOCHS, STEPS = 15, 10, 675
TRAIN = f"optimizer=adamw,lr=0.01,warmup={STEPS // 10},clip_grad=1"
LOWER = "lower-conv-svd{ratio=2%s},lower-linear-svd{ratio=2%s}"
SEEDS = (0, 1, 2)
ARMS = [f"{base}{fit}{distill}" for base in ("conventional", "deeptwist", "handoff") for fit in ("", "+fit")
        for distill in ("", "+distill")] + ["post-training", "post-training+fit", "dense"]


def pipeline(arm: str, seed: int) -> str:
    fit = ",fit=activation" if "+fit" in arm else ""
    extra = expkit.DISTILLATION if "+distill" in arm else ""
    train = lambda epochs, more="": f"train{{epochs={epochs},{TRAIN},seed={seed}{extra}{more}}}"  # noqa: E731
    calibrate = "calibrate{batches=16}," if fit else ""
    if arm == "dense":  # the same fine-tuning without compression: what the extra epochs alone give
        return f"{train(EPOCHS)},fold,cleanup"
    if arm.startswith("post-training"):
        return calibrate + LOWER % (fit, fit) + ",fold,cleanup"
    if arm.startswith("conventional"):
        return f"{calibrate}{LOWER % (fit, fit)},{train(EPOCHS)},fold,cleanup"
    deeptwist = f"{calibrate}deeptwist{{decomp=svd,ratio=2,period=2{fit}}}"
    if arm.startswith("deeptwist"):
        return f"{deeptwist},{train(EPOCHS)},{LOWER % ('', '')},fold,cleanup"
    return (f"{deeptwist},{train(HANDOFF_EPOCHS)},{LOWER % ('', '')},"
            f"{train(EPOCHS - HANDOFF_EPOCHS, ',handoff=continue')},fold,cleanup")


def run(mf, original, arm: str, seed: int) -> dict:
    spec = pipeline(arm, seed)
    start = time.perf_counter()
    torch.manual_seed(seed)
    gm = trace(copy.deepcopy(original), mf.example_inputs())
    ctx = RunContext(mf.data("train_data"), None, progress=False, teacher=original)
    gm = Pipeline.parse(spec).run(gm, ctx)
    correct = expkit.correctness(gm, mf.data("eval_data")())
    train = ctx.results.get("train")
    return {"arm": arm, "seed": seed, "pipeline": spec, "test_acc": float(correct.mean()), "test_n": int(correct.size),
            "test_correct": expkit.pack_bools(correct), "steps": train.steps if train else 0,
            "teacher_seconds": train.teacher_seconds if train else 0.0,
            "train_seconds": train.seconds if train else 0.0,
            "minutes": (time.perf_counter() - start) / 60, **expkit.metadata()}


def report(store: expkit.RunStore, baseline: float) -> None:
    runs = store.load_all()
    by_arm = {arm: sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"]) for arm in ARMS}
    conventional = {r["seed"]: r for r in by_arm["conventional"]}
    rows = []
    for arm, rs in by_arm.items():
        if not rs:
            continue
        accs = [r["test_acc"] for r in rs]
        pairs = [(r, conventional[r["seed"]]) for r in rs if r["seed"] in conventional and arm != "conventional"]
        teacher = [r["teacher_seconds"] / r["train_seconds"] for r in rs if r.get("teacher_seconds")]
        rows.append([arm, f"{100 * np.mean(accs):.2f} ({' / '.join(f'{100 * a:.2f}' for a in accs)})",
                     f"{100 * (np.mean(accs) - baseline):+.2f}", expkit.paired_difference(pairs),
                     f"{100 * np.mean(teacher):.0f}%" if teacher else "-"])
    md = ["# Accuracy recipes on the digits transformer at 2x (SVD of its attention and MLP Linears)\n",
          f"Dense model: **{100 * baseline:.2f}%** on its 360 held-out images. Fine-tuning: AdamW, 15 epochs, lr 0.01, "
          "warmup 67 steps, clipping at 1, seeds 0 / 1 / 2 (mean, each seed in brackets). `+fit`: factors fitted "
          "to the layers' inputs (calibrate, 16 batches); `+distill`: distillation from the dense model "
          f"({expkit.DISTILL:g}, temperature {expkit.TEMPERATURE:g}). vs conventional: paired bootstrap over the "
          "held-out images, seeds pooled. Teacher share: the teacher's forwards over all training time.\n",
          expkit.markdown_table(["arm", "held-out acc %", "vs dense", "vs conventional [95% CI]", "teacher share"],
                                rows),
          "\nCommands:\n", *[f"- `{c}`" for c in sorted({r["command"] for r in runs})], ""]
    (store.root / "results.md").write_text("\n".join(md) + "\n")
    slim = [{k: v for k, v in r.items() if k != "test_correct"} for r in runs]
    (store.root / "results.json").write_text(json.dumps({"baseline": baseline, "runs": slim}, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(expkit.REPO / "results" / "transformer_accuracy"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    store = expkit.RunStore(Path(args.out))
    mf = load_model_file(MODEL_FILE, {})
    original = mf.model().eval()
    baseline = float(expkit.correctness(original, mf.data("eval_data")()).mean())
    for arm in ([] if args.report_only else ARMS):
        for seed in SEEDS:
            rid = f"{arm}-s{seed}"
            if store.done(rid):
                continue
            result = run(mf, original, arm, seed)
            store.save(rid, result)
            print(f"{rid}: {100 * result['test_acc']:.2f}% in {result['minutes']:.1f} min", flush=True)
    report(store, baseline)
    return 0


if __name__ == "__main__":
    sys.exit(expkit.resumable(main))
