"""How long `twistc compile` takes, on a quiet machine and beside other busy processes.

Compiles a model file (ResNet-50 at 224 with seeded random weights by default) with
`--pass tucker --ratio 2 --epochs 0` several times in fresh processes and records the wall time a user
waits, twistc's own `seconds` (model built to report written) and the lowering pass's seconds (the
HOOI decompositions) from report.json. With `--load N`, N pure-Python busy loops run beside it, started
`--settle` seconds before the first compile so that the 1-minute load average, which decides how many
threads decompositions get (twistc/decomp/threads.py), has seen them; with no load, timing waits until
the load average is below 0.5 before each compile. Under each load it also times the HOOI of the model's kernels at the
compile's ratio in this process, on 1 thread and on every core, which is what the thread policy rests on.
report.json's phase_seconds say where twistc's own seconds went: tracing, the original's export and
onnxruntime check, the passes, the compiled model's export and check, and model.pt2.

    python tools/compile_time.py --load 0 --load 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import expkit
import torch

from twistc import models
from twistc.convs import conv_sites
from twistc.decomp.rank import tucker_ranks_for_ratio
from twistc.decomp.tucker import tucker2
from twistc.trace import trace

MODELS = {
    "resnet50": ("resnet50", 224),
    "resnet18": ("resnet18", 224),
}
MODEL_FILE = '''import torch
from twistc.models import {name}

def model():
    torch.manual_seed(0)
    return {name}().eval()

def example_inputs():
    return (torch.randn(1, 3, {size}, {size}, generator=torch.Generator().manual_seed(0)),)
'''
BUSY = "while True:\n    pass\n"
# the phases of report.json's phase_seconds in the table (the others take no time with --epochs 0 --no-timing)
PHASES = ("trace", "original.onnx", "passes", "model.onnx", "model.pt2")


def compile_once(model_file: Path, out: Path, threads: int | None) -> dict:
    command = [sys.executable, "-m", "twistc", "compile", str(model_file), "--pass", "tucker", "--ratio", "2",
               "--epochs", "0", "-o", str(out), "--force", "--quiet", "--no-timing"]  # the compile alone
    if threads:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    lowering = sum(s for name, s in report["stage_seconds"].items() if name.startswith("lower"))  # lower{...} or an alias
    return {"wall_s": wall, "twistc_s": report["seconds"], "lowering_s": lowering,
            **{f"{phase}_s": seconds for phase, seconds in report["phase_seconds"].items() if phase in PHASES}}


def hooi_seconds(name: str, size: int) -> dict:
    """Seconds to Tucker-decompose the model's kh x kw kernels at ratio 2, on 1 thread and on all cores."""
    torch.manual_seed(0)
    gm = trace(getattr(models, name)().eval(), (torch.randn(1, 3, size, size),))
    sites = [s for s in conv_sites(gm) if s.geometry.taps > 1]
    kernels = [s.weight(gm).detach() for s in sites]
    ranks = [tucker_ranks_for_ratio(s.geometry, 2.0) for s in sites]
    out, threads = {}, torch.get_num_threads()
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        start = time.perf_counter()
        for kernel, r in zip(kernels, ranks):
            tucker2(kernel, r)
        out[f"hooi_s_{n}_threads"] = time.perf_counter() - start
    torch.set_num_threads(threads)
    return out


def wait_until_quiet(most: float = 300.0) -> None:
    start = time.monotonic()
    while os.getloadavg()[0] >= 0.5 and time.monotonic() - start < most:
        time.sleep(5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=list(MODELS), default="resnet50")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--load", type=int, action="append", help="busy processes beside the compile (repeatable)")
    p.add_argument("--settle", type=float, default=90.0, help="seconds the busy processes run before timing")
    p.add_argument("--threads", type=int, help="--threads of twistc compile (default: torch's)")
    p.add_argument("--out", default=str(expkit.REPO / "results" / "compile_time"))
    args = p.parse_args()
    name, size = MODELS[args.model]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        model_file = Path(folder) / "model.py"
        model_file.write_text(MODEL_FILE.format(name=name, size=size))
        for load in args.load or [0]:
            busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
            try:
                time.sleep(args.settle if load else 0)
                runs = []
                for _ in range(args.reps):
                    if not load:
                        wait_until_quiet()
                    runs.append({"load_average": os.getloadavg()[0],
                                 **compile_once(model_file, Path(folder) / "out", args.threads)})
                hooi = hooi_seconds(name, size)
            finally:
                for proc in busy:
                    proc.kill()
            row = {"model": args.model, "busy_processes": load, "runs": runs,
                   **{f"median_{k}": statistics.median(r[k] for r in runs) for k in runs[0]}, **hooi}
            print(f"{args.model}, {load} busy: wall {row['median_wall_s']:.1f} s, twistc {row['median_twistc_s']:.1f} s, "
                  f"lowering {row['median_lowering_s']:.1f} s, {hooi}", flush=True)
            results.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}.json").write_text(json.dumps({**expkit.metadata(), "results": results}, indent=2) + "\n")
    cores = os.cpu_count() or 1
    table = expkit.markdown_table(
        ["model", "busy processes", "load avg", "wall s (median)", "twistc s", *(f"{p} s" for p in PHASES),
         "of which lowering s", "runs", "HOOI s, 1 thread", f"HOOI s, {cores} threads"],
        [[r["model"], r["busy_processes"], f"{r['median_load_average']:.1f}", f"{r['median_wall_s']:.1f}",
          f"{r['median_twistc_s']:.1f}", *(f"{r[f'median_{p}_s']:.1f}" for p in PHASES),
          f"{r['median_lowering_s']:.1f}", len(r["runs"]),
          f"{r['hooi_s_1_threads']:.1f}", f"{r[f'hooi_s_{cores}_threads']:.1f}"] for r in results])
    (out / f"{args.model}.md").write_text(f"`{expkit.metadata()['command']}`\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
