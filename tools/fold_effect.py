"""What the `fold` pass buys: each compiled model timed without and with it, paired, in both runtimes.

For CIFAR ResNet-32 (the trained checkpoint) and ResNet-18 at 224 (seeded random weights), two
compilations: uniform Tucker at ratio 2, and plan-latency at a measured 1.5x (onnxruntime, 1 thread,
batch 1; the latency cache makes a rerun cheap). Each is timed as lowered (`...,cleanup`) and after
`fold,cleanup`, round-robin, in onnxruntime (its own exporter already folds BatchNorm into a preceding
conv, so only merged convs can count there) and in PyTorch eager, at batch 1 on 1 thread.

    python tools/fold_effect.py
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

import expkit

from twistc import Pipeline, state_of, trace
from twistc.latency import Runtime, compare_models, model_timer
from twistc.models import load_resnet32, resnet18

log = logging.getLogger("fold_effect")
MODELS = {
    "resnet32": (lambda: load_resnet32(expkit.SHARED_DATA / "resnet32_cifar10.pt"), (1, 3, 32, 32)),
    "resnet18": (lambda: resnet18(), (1, 3, 224, 224)),
}
COMPILES = {
    "tucker r=2": "lower-conv-tucker{ratio=2},cleanup",
    "plan 1.5x": "plan-latency{speedup=1.5,cache=%s},lower,cleanup",
}


def census(gm: nn.Module) -> dict:
    kinds = [type(m).__name__ for m in gm.modules()]
    layers = state_of(gm).layers.values()
    return {"convs": kinds.count("Conv2d"), "batchnorms": kinds.count("BatchNorm2d"),
            "parameters": sum(p.numel() for p in gm.parameters()),
            "conv_weights": sum(r.current.params for r in layers), "conv_macs": sum(r.current.macs for r in layers)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--latency-cache", default=str(expkit.CHECKPOINTS.parent / "latency.json"))
    p.add_argument("--out", default=str(expkit.REPO / "results" / "fold_effect"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    results, rows = [], []
    for model_name, (build, shape) in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(*shape)
        for label, spec in COMPILES.items():
            spec = spec % args.latency_cache if "%s" in spec else spec
            lowered = Pipeline.parse(spec).run(trace(model, (x,))).eval()
            folded = Pipeline.parse("fold,cleanup").run(copy.deepcopy(lowered)).eval()
            torch.testing.assert_close(folded(x), lowered(x), atol=1e-4, rtol=1e-4)
            row = {"model": model_name, "compile": label, "spec": spec, "lowered": census(lowered),
                   "folded": census(folded)}
            for runtime in ("ort", "torch"):
                timers = [model_timer(m, x, Runtime(runtime, "cpu", 1, 1)) for m in (lowered, folded)]
                timing = compare_models(timers, reps=args.reps)
                row[runtime] = {k: timing[k] for k in ("median_ms", "speedup", "speedup_ci95")}
                log.info("%s %s %s: %.3f -> %.3f ms (%.3fx)", model_name, label, runtime, *timing["median_ms"],
                         timing["speedup"])
            results.append(row)
            lo, fo = row["lowered"], row["folded"]
            rows.append([model_name, label, f"{lo['convs']} / {lo['batchnorms']}", f"{fo['convs']} / {fo['batchnorms']}",
                         f"{lo['conv_macs'] / 1e6:.1f}M -> {fo['conv_macs'] / 1e6:.1f}M",
                         *(f"{row[r]['speedup']:.3f}x [{row[r]['speedup_ci95'][0]:.3f}, {row[r]['speedup_ci95'][1]:.3f}]"
                           for r in ("ort", "torch"))])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = expkit.metadata()
    (out / "results.json").write_text(json.dumps({**meta, "reps": args.reps, "results": results}, indent=2) + "\n")
    table = expkit.markdown_table(
        ["model", "compile", "convs / BNs lowered", "convs / BNs folded", "conv MACs",
         "fold speedup, onnxruntime (95% CI)", "fold speedup, PyTorch eager (95% CI)"], rows)
    (out / "results.md").write_text(f"# What `fold` buys (batch 1, 1 thread)\n\n{table}\n\n"
                                    f"{meta['machine']['cpu']}. Command: `{meta['command']}`\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
