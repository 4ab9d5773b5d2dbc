"""Tucker-2 decomposition speed: tensorly's partial_tucker against twistc's Gram-matrix HOSVD/HOOI.

For the 16 3x3 convs of a ResNet-50 (bottleneck widths 64, 128, 256, 512) and the 30 3x3 convs of a
CIFAR ResNet-32, at half rank on each channel mode. Weights are Gaussian: only time and relative
error are compared, and both are reported. Writes results/bench_tucker/results.{json,md}.

    python tools/bench_tucker.py [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

import expkit
from twistc.decomp.tucker import hooi, hosvd

MODELS = {
    "resnet50": [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3,
    "resnet32": [16] * 10 + [32] * 10 + [64] * 10,
}


def _tensorly(w, ranks):
    with tl.backend_context("pytorch"):
        (core, factors), _ = partial_tucker(w, rank=list(ranks), modes=[0, 1])
        return tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])


METHODS = {
    "tensorly partial_tucker (truncated_svd, HOOI)": _tensorly,
    "twistc hosvd (Gram eigh)": lambda w, r: hosvd(w, r).reconstruct(),
    "twistc hooi (Gram eigh, from HOSVD's input factor, stops at <0.1% gain)": lambda w, r: hooi(w, r).reconstruct(),
    "twistc hooi, 10 refits": lambda w, r: hooi(w, r, rtol=0).reconstruct(),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(expkit.REPO / "results" / "bench_tucker"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, results = [], []
    for model, widths in MODELS.items():
        torch.manual_seed(0)
        weights = [torch.randn(c, c, 3, 3) for c in widths]
        for name, fn in METHODS.items():
            start = time.perf_counter()
            errors = [float((fn(w, (w.shape[0] // 2, w.shape[1] // 2)) - w).norm() / w.norm()) for w in weights]
            seconds = time.perf_counter() - start
            results.append({"model": model, "method": name, "layers": len(weights), "seconds": seconds,
                            "mean_relative_error": sum(errors) / len(errors)})
            rows.append([model, len(weights), name, f"{seconds:.2f}", f"{results[-1]['mean_relative_error']:.4f}"])
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = expkit.metadata()
    (out / "results.json").write_text(json.dumps({"results": results, **meta}, indent=1) + "\n")
    table = expkit.markdown_table(["model", "3x3 convs", "method", "seconds (all layers)", "mean rel. error"], rows)
    (out / "results.md").write_text(
        "# Tucker-2 at half rank: decomposition time\n\n" + table +
        f"\n\n{meta['machine']['cpu']}, {args.threads} thread(s), torch {meta['versions']['torch']}, "
        f"tensorly {tl.__version__}.\nCommand: `{meta['command']}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
