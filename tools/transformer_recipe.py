"""DeepTwist vs. conventional fine-tuning of the digits transformer, with and without the usual
transformer recipe (linear warmup over the first 10% of steps, gradient clipping at norm 1).

The model is examples/digits_transformer.py (trained from scratch, 96.67% on its 360 held-out
images). All 14 compressible layers (patch conv, attention and MLP Linears) are cut 2x in weights:

  deeptwist:    deeptwist{decomp=svd,ratio=2,period=25},train{...},lower-conv-svd,lower-linear-svd,fold,cleanup
  conventional: lower-conv-svd{ratio=2},lower-linear-svd{ratio=2},train{...},fold,cleanup

train{...} is AdamW for 15 epochs (675 steps) at each peak learning rate, cosine decay, seeds 0-2;
the recipe adds warmup=67,clip_grad=1 (warmup over 10% of the steps), and each half of it alone.
Then DeepTwist's S_D is swept at its best lr and recipe.
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
PERIOD = 25  # DeepTwist's S_D in the main grid
SWEEP = (0.01, "warmup", (1, 2, 5, 10, 50, 100))  # S_D values tried at DeepTwist's best lr and recipe


def pipeline(arm: str, lr: float, recipe: str, seed: int, period: int = PERIOD) -> str:
    train = f"train{{epochs={EPOCHS},optimizer=adamw,lr={lr:g},seed={seed}{RECIPES[recipe]}}}"
    if arm == "deeptwist":
        return f"deeptwist{{decomp=svd,ratio=2,period={period}}},{train},lower-conv-svd,lower-linear-svd,fold,cleanup"
    return f"lower-conv-svd{{ratio=2}},lower-linear-svd{{ratio=2}},{train},fold,cleanup"


def run_id(arm: str, lr: float, recipe: str, seed: int, period: int = PERIOD) -> str:
    return f"{arm}-lr{lr:g}-{recipe}" + (f"-sd{period}" if period != PERIOD else "") + f"-s{seed}"


def grid() -> list[tuple]:
    """(arm, lr, recipe, seed, period) of every run: the main grid, then DeepTwist's S_D sweep."""
    main = [(arm, lr, recipe, seed, PERIOD) for lr in LRS for recipe in RECIPES for seed in SEEDS for arm in ARMS]
    lr, recipe, periods = SWEEP
    return main + [("deeptwist", lr, recipe, seed, period) for period in periods for seed in SEEDS]


def run(mf, original, arm: str, lr: float, recipe: str, seed: int, period: int = PERIOD) -> dict:
    spec = pipeline(arm, lr, recipe, seed, period)
    start = time.perf_counter()
    gm = trace(copy.deepcopy(original), mf.example_inputs())
    ctx = RunContext(mf.data("train_data"), None, progress=False)
    gm = Pipeline.parse(spec).run(gm, ctx)
    correct = expkit.correctness(gm, mf.data("eval_data")())
    train = ctx.results["train"]
    return {"arm": arm, "lr": lr, "recipe": recipe, "seed": seed, "period": period, "pipeline": spec,
            "test_acc": float(correct.mean()), "test_n": int(correct.size), "test_correct": expkit.pack_bools(correct),
            "steps": train.steps, "losses": train.losses, "distortion_changes": train.distortion_changes, "minutes": (time.perf_counter() - start) / 60,
            **expkit.metadata()}


def report(store: expkit.RunStore, out: Path, baseline: float) -> str:
    everything = {(r["arm"], r["lr"], r["recipe"], r["seed"], r.get("period", PERIOD)): r for r in store.load_all()}
    runs = {key[:4]: r for key, r in everything.items() if key[0] == "conventional" or key[4] == PERIOD}
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
    lr, recipe, periods = SWEEP
    best = max(((a, b) for a in LRS for b in RECIPES if all(("conventional", a, b, s) in runs for s in SEEDS)),
               key=lambda c: np.mean([runs[("conventional", *c, s)]["test_acc"] for s in SEEDS]), default=None)
    sweep_rows = []
    for period in sorted({PERIOD, *periods}):
        pairs = [(everything[("deeptwist", lr, recipe, s, period)], everything[("conventional", lr, recipe, s, PERIOD)])
                 for s in SEEDS if ("deeptwist", lr, recipe, s, period) in everything
                 and ("conventional", lr, recipe, s, PERIOD) in everything]
        if pairs:
            accs = [100 * a["test_acc"] for a, _ in pairs]
            # ||W - P(W)|| / ||W|| at each distortion, mean over layers, then over the run's second half
            changes = [np.mean(a["distortion_changes"][len(a["distortion_changes"]) // 2:]) for a, _ in pairs
                       if a.get("distortion_changes")]
            vs_best = [(a, runs[("conventional", *best, a["seed"])]) for a, _ in pairs] if best else []
            sweep_rows.append([period, len(pairs), f"{np.mean(accs):.2f} ({' / '.join(f'{v:.2f}' for v in accs)})",
                               expkit.paired_difference(pairs), expkit.paired_difference(vs_best),
                               f"{100 * np.mean(changes):.1f}%" if changes else "-"])
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
        f"## DeepTwist's S_D at lr {lr:g}, recipe `{recipe}`\n\nAgainst conventional fine-tuning with the same lr "
        "and recipe, and against conventional fine-tuning at its best setting"
        + (f" (lr {best[0]:g}, `{best[1]}`)" if best else "") + ", seeds paired.\n\n"
        + expkit.markdown_table(["S_D", "seeds", "DeepTwist %", "DT - conv (same lr and recipe), 95% CI",
                                 "DT - conv at its best, 95% CI",
                                 "kernel change at a distortion (second half of training)"], sweep_rows),
        f"Command: `{any_run.get('command', 'python tools/transformer_recipe.py')}`; machine: "
        f"{any_run.get('machine', {}).get('cpu', '?')}.",
    ]) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"baseline": baseline, "rows": rows, "sweep": sweep_rows},
                                                 indent=1) + "\n")
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
