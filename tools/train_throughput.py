"""Training throughput of CIFAR ResNet-32 on this machine, and what DeepTwist adds to it.

1. Images per second of one SGD step (batch 128, forward + backward + update) in eager mode, eager
   with channels_last, and under torch.compile (default mode), timed round-robin after warm-up.
2. DeepTwist's own cost: a step through the projections (no distortion) against a dense step (both
   traced GraphModules, as the train stage runs them), and
   the time of one distortion (a Tucker-2 projection of all 30 residual-stage convs at 4.3x). Its
   overhead at a period S_D is (step_projected - step_dense + distortion / S_D) / step_dense.

Inputs are random tensors of CIFAR-10's shape: throughput does not depend on the pixel values.

    python tools/train_throughput.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import expkit

from twistc import Pipeline, trace
from twistc.models import resnet_cifar
from twistc.train import projections

log = logging.getLogger("train_throughput")
PERIODS = (50, 200)


def _step_timer(model, batch: int, channels_last: bool = False):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    model.train()

    def step() -> float:
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def _round_robin(timers: dict, warmup: int, reps: int) -> dict[str, float]:
    for _ in range(warmup):
        for t in timers.values():
            t()
    times = {k: [] for k in timers}
    for _ in range(reps):
        for k, t in timers.items():
            times[k].append(t())
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=str(expkit.REPO / "results" / "train_throughput"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eager = resnet_cifar(32)
    last = resnet_cifar(32).to(memory_format=torch.channels_last)
    timers = {"eager": _step_timer(eager, args.batch),
              "channels_last": _step_timer(last, args.batch, channels_last=True)}
    compile_error = None
    try:
        timers["torch.compile"] = _step_timer(torch.compile(resnet_cifar(32)), args.batch)
        timers["torch.compile"]()  # compiles now, so that a failure is caught here
    except Exception as e:  # no C++ compiler, an unsupported platform, ...
        compile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        timers.pop("torch.compile", None)
    log.info("throughput: %s", ", ".join(timers))
    step_s = _round_robin(timers, warmup=3, reps=args.reps)
    log.info("DeepTwist: projected step and one distortion")
    dense = trace(resnet_cifar(32), (torch.randn(1, 3, 32, 32),))  # traced too, as the train stage sees it
    projected = Pipeline.parse("deeptwist{layers=layer*,ratio=4.3,period=1000000}").run(
        trace(resnet_cifar(32), (torch.randn(1, 3, 32, 32),)))
    steps = _round_robin({"dense": _step_timer(dense, args.batch), "projected": _step_timer(projected, args.batch)},
                         warmup=3, reps=args.reps)
    distortions = []
    for _ in range(3):
        start = time.perf_counter()
        for proj in projections(projected):
            proj.project_(projected.get_parameter(proj.weight_name))
        distortions.append(time.perf_counter() - start)
    distortion = statistics.median(distortions)
    overhead = {sd: (steps["projected"] - steps["dense"] + distortion / sd) / steps["dense"] for sd in PERIODS}
    result = {"images_per_second": {k: args.batch / v for k, v in step_s.items()}, "step_seconds": step_s,
              "torch_compile_error": compile_error,
              "deeptwist": {"dense_step_s": steps["dense"], "projected_step_s": steps["projected"],
                            "distortion_s": distortion, "overhead": {str(k): v for k, v in overhead.items()}},
              "batch": args.batch, "reps": args.reps, **expkit.metadata()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = [[k, f"{v:.0f}", f"{step_s[k] * 1e3:.0f}"] for k, v in result["images_per_second"].items()]
    md = ["# Training throughput, CIFAR ResNet-32\n",
          f"Batch {args.batch}, {args.threads} threads, {result['machine']['cpu']}; medians of {args.reps} steps "
          "timed round-robin after 3 warm-up steps; random inputs of CIFAR-10's shape.\n",
          expkit.markdown_table(["mode", "images/s", "ms per step"], rows),
          *([f"\ntorch.compile did not run here: {compile_error}"] if compile_error else []),
          "\n## DeepTwist's overhead\n",
          f"Dense step {steps['dense'] * 1e3:.0f} ms, step through the 30 projections {steps['projected'] * 1e3:.0f} "
          f"ms, one distortion (30 Tucker-2 projections at 4.3x) {distortion * 1e3:.0f} ms.\n",
          expkit.markdown_table(["S_D", "overhead vs dense fine-tuning"],
                                [[sd, f"{100 * v:.1f}%"] for sd, v in overhead.items()]),
          f"\nCommand: `{result['command']}`\n"]
    (out / "results.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
