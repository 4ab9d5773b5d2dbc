"""The paper's synthetic tiling test (Lee et al. 2019, Sec. 5): a 1024 x 1024 Gaussian matrix split
into 1x1, 16x16 and 128x128 grids of tiles, every tile compressed by SVD to the same overall 4x.

Reports the relative Frobenius error per tiling and plots histograms of the reconstructed entries
(the paper finds that more tiles give more near-zero and more large entries). Writes
results/tiling_synthetic/{results.json,results.md,histogram.png}.

    python tools/tiling_synthetic.py [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import expkit
from twistc.decomp.tiling import TileGrid, rank_for_ratio, tiled_svd

GRIDS = ((1, 1), (16, 16), (128, 128))
RATIO = 4.0
SIZE = 1024


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(expkit.REPO / "results" / "tiling_synthetic"))
    args = p.parse_args()
    torch.manual_seed(args.seed)
    matrix = torch.randn(SIZE, SIZE, dtype=torch.float64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, results, recon = [], [], {}
    for grid_shape in GRIDS:
        grid = TileGrid.from_grid((SIZE, SIZE), grid_shape)
        rank = rank_for_ratio(grid, RATIO)
        start = time.perf_counter()
        approx = tiled_svd(matrix, grid, rank).reconstruct()
        seconds = time.perf_counter() - start
        error = float((approx - matrix).norm() / matrix.norm())
        values = approx.flatten().numpy()
        near_zero = float(np.mean(np.abs(values) < 0.05))
        large = float(np.mean(np.abs(values) > 2.0))
        ratio = SIZE * SIZE / grid.factor_params(rank)
        results.append({"grid": list(grid_shape), "tile": list(grid.tile), "rank": rank, "ratio": ratio,
                        "relative_error": error, "share_abs_below_0.05": near_zero, "share_abs_above_2": large,
                        "std": float(values.std()), "seconds": seconds})
        rows.append([f"{grid_shape[0]}x{grid_shape[1]}", f"{grid.tile[0]}x{grid.tile[1]}", rank, f"{ratio:.2f}x",
                     f"{error:.4f}", f"{100 * near_zero:.2f}", f"{100 * large:.3f}", f"{values.std():.4f}"])
        recon[grid_shape] = values
        print(rows[-1], flush=True)
    meta = expkit.metadata()
    (out / "results.json").write_text(json.dumps({"seed": args.seed, "results": results, **meta}, indent=1) + "\n")
    table = expkit.markdown_table(["grid", "tile", "rank", "ratio", "rel. Frobenius error", "% |w| < 0.05",
                                   "% |w| > 2", "std of entries"], rows)
    (out / "results.md").write_text(
        f"# Tiled SVD of a {SIZE}x{SIZE} Gaussian matrix at {RATIO:g}x\n\n{table}\n\n"
        "Every tile gets the same rank; the ratio counts all U and V entries against the dense matrix. "
        f"Histograms: histogram.png. Seed {args.seed}. Command: `{meta['command']}`\n")
    _plot(recon, out / "histogram.png")
    return 0


def _plot(recon, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-3, 3, 121)
    for grid, values in recon.items():
        ax.hist(values, bins=bins, histtype="step", label=f"{grid[0]}x{grid[1]} tiles", density=True)
    ax.set_yscale("log")
    ax.set_xlabel("reconstructed weight value")
    ax.set_ylabel("density (log)")
    ax.set_title(f"{SIZE}x{SIZE} Gaussian, tiled SVD at {RATIO:g}x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
