"""Latency of the exact lowered forms of a conv in onnxruntime, on the ResNet-32 layer shapes.

For each conv shape and batch size, the dense conv and its lowerings at the same rank budget are
exported to ONNX and timed side by side with `twistc.bench` (round-robin, medians after warm-up):
SVD as a conv pair, SVD as im2col + GEMM, tiled SVD as im2col + batched tile GEMMs, each im2col
written three ways ("unfold": gather-based; "onehot": a grouped one-hot conv; "slices": strided
slices per kernel tap), tiled SVD in tap-major order as "tap-blocks" (no im2col matrix: grouped
1x1 convs on each tap's slice), and tiles of whole input channels (16x18: 2 channels with their 9
taps) as "channel-blocks" (a grouped 3x3 conv, then a grouped 1x1 conv) beside one-hot im2col on the
same tiles. The fastest exact forms are the passes' default. Writes
results/bench_im2col/{results.json,results.md}.

    python tools/bench_im2col.py [--threads 1] [--ratio 2]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import expkit
import twistc
from twistc.bench import bench

# (name, in, out, stride, input size): the distinct 3x3 convs of a CIFAR ResNet-32
IM2COL = ("unfold", "onehot", "slices")
SHAPES = [("16->16 @32", 16, 16, 1, 32), ("16->32 s2 @32", 16, 32, 2, 32), ("32->32 @16", 32, 32, 1, 16),
          ("32->64 s2 @16", 32, 64, 2, 16), ("64->64 @8", 64, 64, 1, 8)]


def variants(ratio: float, tile: int) -> dict[str, str | None]:
    tiled = f"lower-conv-tiled-lowrank{{{{tile={tile}x{tile},ratio={ratio:g},im2col={{}}}}}}"
    width = 9 * max(1, round(tile / 9))  # the nearest tile width of whole channels of a 3x3 conv
    blocks = f"lower-conv-tiled-lowrank{{{{tile={tile}x{width},ratio={ratio:g},im2col={{}}}}}}"
    return {
        "dense": None,
        "svd conv pair": f"lower-conv-svd{{ratio={ratio:g}}}",
        **{f"svd im2col {m}": f"lower-conv-svd{{form=im2col,im2col={m},ratio={ratio:g}}}" for m in IM2COL},
        **{f"tiled {tile}x{tile} {m}": tiled.format(m) for m in IM2COL},
        f"tiled {tile}x{tile} tap-blocks": tiled.format("tap-blocks,order=tap-major"),
        f"tiled {tile}x{width} onehot": blocks.format("onehot"),
        f"tiled {tile}x{width} channel-blocks": blocks.format("channel-blocks"),
    }


def export_variants(name, cin, cout, stride, size, ratio, tile, folder: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)).eval()
    x = torch.randn(1, cin, size, size)
    paths = {}
    for label, spec in variants(ratio, tile).items():
        model = conv if spec is None else twistc.Pipeline.parse(spec + ",cleanup").run(twistc.trace(conv, (x,)))
        path = folder / f"{len(paths)}.onnx"
        twistc.export_onnx(model, (x,), path)
        paths[label] = path
    return paths


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ratio", type=float, default=2.0)
    p.add_argument("--tile", type=int, default=16)
    p.add_argument("--batches", default="1,128")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=str(expkit.REPO / "results" / "bench_im2col"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results, rows = [], []
    labels = list(variants(args.ratio, args.tile))
    with tempfile.TemporaryDirectory() as tmp:
        for shape in SHAPES:
            paths = export_variants(*shape, args.ratio, args.tile, Path(tmp))
            for batch in (int(b) for b in args.batches.split(",")):
                reps = args.reps if batch == 1 else max(5, args.reps // 3)
                timing = bench([str(paths[k]) for k in labels], batch=batch, threads=args.threads, reps=reps)
                medians = {k: m["median_ms"] for k, m in zip(labels, timing["models"])}
                results.append({"shape": shape[0], "batch": batch, "reps": reps, "median_ms": medians})
                rows.append([shape[0], batch] + [f"{medians[k]:.3f} ({medians[k] / medians['dense']:.2f})"
                                                 for k in labels])
                print(rows[-1], flush=True)
    geo = {k: math.exp(sum(math.log(r["median_ms"][k] / r["median_ms"]["dense"]) for r in results) / len(results))
           for k in labels}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = expkit.metadata()
    (out / "results.json").write_text(json.dumps({"ratio": args.ratio, "tile": args.tile, "threads": args.threads,
                                                  "results": results, "geomean_vs_dense": geo, **meta}, indent=1) + "\n")
    table = expkit.markdown_table(["conv", "batch"] + labels, rows)
    geo_row = expkit.markdown_table(labels, [[f"{geo[k]:.2f}" for k in labels]])
    (out / "results.md").write_text(
        f"# Lowered conv latency in onnxruntime (CPU EP, {args.threads} thread)\n\n"
        f"Median ms over round-robin repetitions (ratio to dense in parentheses); every lowering at "
        f"{args.ratio:g}x fewer weights than the dense 3x3 conv.\n\n{table}\n\n"
        f"Geometric mean of the ratio to dense over all rows:\n\n{geo_row}\n\n"
        f"{meta['machine']['cpu']}, onnxruntime {meta['versions']['onnxruntime']}. Command: `{meta['command']}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
