"""VBMF ranks on the trained CIFAR-10 ResNet-32: the ranks it picks per layer, and what they cost.

Compiles examples/resnet32_cifar10.py with `lower-conv-tucker{rank=vbmf,weaken=W}` (no fine-tuning)
for each W, and keeps each run's report (per-layer ranks, weights, accuracy on the test set before
and after) under results/vbmf_ranks/.

    python tools/vbmf_ranks.py --weaken 0 --weaken 0.5 --threads 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import expkit


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weaken", type=float, action="append", help="VBMF weakening factors (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(expkit.REPO / "results" / "vbmf_ranks"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for weaken in args.weaken or [0.0]:
        with tempfile.TemporaryDirectory() as folder:
            spec = f"lower-conv-tucker{{rank=vbmf,weaken={weaken:g}}},fold,cleanup"
            subprocess.run([sys.executable, "-m", "twistc", "compile", str(expkit.REPO / "examples" / "resnet32_cifar10.py"),
                            "--pass", spec, "--threads", str(args.threads), "-o", f"{folder}/o", "--quiet"],
                           check=True, cwd=expkit.REPO)
            report = json.loads(Path(folder, "o", "report.json").read_text())
            (out / f"report-weaken{weaken:g}.md").write_text(Path(folder, "o", "report.md").read_text())
        keep = {k: report[k] for k in ("pipeline", "totals", "compressed_layers", "model", "accuracy", "versions")}
        keep["layers"] = [{k: layer[k] for k in ("name", "shape", "ranks", "params_before", "params_after", "skip_reason")}
                          for layer in report["layers"]]
        (out / f"weaken{weaken:g}.json").write_text(json.dumps({**expkit.metadata(), **keep}, indent=2) + "\n")
        acc = report["accuracy"]
        rows.append([f"{weaken:g}", report["compressed_layers"]["count"], f"{report['compressed_layers']['ratio']:.2f}x",
                     f"{100 * acc['before']:.2f}", f"{100 * acc['after']:.2f}"])
    table = expkit.markdown_table(["weaken", "layers lowered", "their weights", "test acc before %",
                                   "after, no fine-tuning %"], rows)
    (out / "results.md").write_text(f"# VBMF ranks on CIFAR-10 ResNet-32\n\n{table}\n\nPer-layer ranks: "
                                    f"report-weaken*.md. Command: `{expkit.metadata()['command']}`\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
