"""DeepTwist vs. conventional fine-tuning of the digits transformer, with and without the usual
transformer recipe (linear warmup over the first 10% of steps, gradient clipping at norm 1).

The model is examples/digits_transformer.py (trained from scratch, 96.67% on its 360 held-out
images). All 14 compressible layers (patch conv, attention and MLP Linears) are cut 2x in weights:

  deeptwist:    deeptwist{decomp=svd,ratio=2,period=25},train{...},lower-conv-svd,lower-linear-svd,fold,cleanup
  conventional: lower-conv-svd{ratio=2},lower-linear-svd{ratio=2},train{...},fold,cleanup

train{...} is AdamW for 15 epochs (675 steps) at each peak learning rate, cosine decay, seeds 0-2;
the recipe adds warmup=67,clip_grad=1 (warmup over 10% of the steps), and each half of it alone.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import expkit  # noqa: E402

from twistc import Pipeline, RunContext, trace  # noqa: E402
from twistc.modelfile import load_model_file  # noqa: E402

log = logging.getLogger("transformer_recipe")
MODEL_FILE = expkit.REPO / "examples" / "digits_transformer.py"
EPOCHS, STEPS = 15, 675
RECIPES = {"plain": "", "warmup-clip": f",warmup={STEPS // 10},clip_grad=1",  # and each half alone
           "warmup": f",warmup={STEPS // 10}", "clip": ",clip_grad=1"}
LRS = (0.001, 0.003, 0.01)
SEEDS = (0, 1, 2)
ARMS = ("deeptwist", "conventional")


def pipeline(arm: str, lr: float, recipe: str, seed: int) -> str:
    train = f"train{{epochs={EPOCHS},optimizer=adamw,lr={lr:g},seed={seed}{RECIPES[recipe]}}}"
    if arm == "deeptwist":
        return f"deeptwist{{decomp=svd,ratio=2,period=25}},{train},lower-conv-svd,lower-linear-svd,fold,cleanup"
    return f"lower-conv-svd{{ratio=2}},lower-linear-svd{{ratio=2}},{train},fold,cleanup"


def run_id(arm: str, lr: float, recipe: str, seed: int) -> str:
    return f"{arm}-lr{lr:g}-{recipe}-s{seed}"


def run(mf, original, arm: str, lr: float, recipe: str, seed: int) -> dict:
    spec = pipeline(arm, lr, recipe, seed)
    start = time.perf_counter()
    gm = trace(copy.deepcopy(original), mf.example_inputs())
    ctx = RunContext(mf.data("train_data"), None, progress=False)
    gm = Pipeline.parse(spec).run(gm, ctx)
    correct = expkit.correctness(gm, mf.data("eval_data")())
    train = ctx.results["train"]
    return {"arm": arm, "lr": lr, "recipe": recipe, "seed": seed, "pipeline": spec,
            "test_acc": float(correct.mean()), "test_n": int(correct.size), "test_correct": expkit.pack_bools(correct),
            "steps": train.steps, "losses": train.losses, "minutes": (time.perf_counter() - start) / 60,
            **expkit.metadata()}


def report(store: expkit.RunStore, out: Path, baseline: float) -> str:
    runs = {(r["arm"], r["lr"], r["recipe"], r["seed"]): r for r in store.load_all()}
    rows = []
    for lr in LRS:
        for recipe in RECIPES:
            accs = {arm: [runs[(arm, lr, recipe, s)]["test_acc"] for s in SEEDS if (arm, lr, recipe, s) in runs]
                    for arm in ARMS}
            pairs = [(runs[("deeptwist", lr, recipe, s)], runs[("conventional", lr, recipe, s)]) for s in SEEDS
                     if ("deeptwist", lr, recipe, s) in runs and ("conventional", lr, recipe, s) in runs]
            if not pairs:
                continue
            cells = [f"{100 * np.mean(a):.2f} ({' / '.join(f'{100 * v:.2f}' for v in a)})" for a in accs.values()]
            rows.append([f"{lr:g}", recipe, *cells, expkit.paired_difference(pairs)])
    any_run = next(iter(runs.values()), {})
    text = "\n\n".join([
        "# DeepTwist vs. conventional fine-tuning of the digits transformer, with the transformer recipe",
        f"Model: `examples/digits_transformer.py`, {100 * baseline:.2f}% on its {any_run.get('test_n', 360)} "
        f"held-out images before compression. Both arms cut all 14 compressible layers 2x in weights (SVD) and "
        f"fine-tune with AdamW for {EPOCHS} epochs ({STEPS} steps), cosine decay from the peak lr; DeepTwist "
        f"uses S_D = 25. Recipe `warmup-clip` adds `warmup={STEPS // 10},clip_grad=1`; `warmup` and `clip` each "
        f"half of it alone. Accuracy: mean over seeds "
        f"(seeds {', '.join(map(str, SEEDS))}). DT - conv: paired bootstrap over the held-out images, seeds pooled.",
        expkit.markdown_table(["peak lr", "recipe", "DeepTwist %", "conventional %", "DT - conv, 95% CI"], rows),
        f"Command: `{any_run.get('command', 'python tools/transformer_recipe.py')}`; machine: "
        f"{any_run.get('machine', {}).get('cpu', '?')}.",
    ]) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"baseline": baseline, "rows": rows}, indent=1) + "\n")
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
    if not args.report_only:
        for lr in LRS:
            for recipe in RECIPES:
                for seed in SEEDS:
                    for arm in ARMS:
                        rid = run_id(arm, lr, recipe, seed)
                        if store.done(rid):
                            continue
                        result = run(mf, original, arm, lr, recipe, seed)
                        store.save(rid, result)
                        log.info("%s: %.2f%% in %.1f min", rid, 100 * result["test_acc"], result["minutes"])
    print(report(store, out, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(expkit.resumable(main))
