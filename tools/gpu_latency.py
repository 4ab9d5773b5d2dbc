"""Where low-rank pays on a GPU, and how much: dense against lowered models across batch, dtype and engine.

For each cell (model, batch, dtype), in the order of CELLS (where arithmetic sets the time first), it
builds three variants of the model, convnets in channels-last:

  dense
  uniform     Tucker-2 for kxk convs, SVD pairs for 1x1 convs and Linear layers, ratio 2 (the `tucker`
              preset's natural forms), ranks rounded to multiples of 8 for Tensor Cores
  plan S      plan-latency{speedup=S} planned in this very setting (PyTorch eager on the device, this
              batch, dtype and memory format, ranks multiples of 8), then lowered the same way; a target
              out of reach is recorded with plan-latency's reason, which names what caps it

and times them paired (round-robin repetitions, medians, the speedup's 95% bootstrap interval) under each
engine: `eager`, `reduce-overhead` (torch.compile with CUDA graphs) and `max-autotune` (torch.compile
tuning its kernels; the slowest to compile, so last). The time limit is checked before each engine of
each cell; what finished is saved per cell, and the same command continues where it stopped.

    python tools/gpu_latency.py --device cuda --limit 480              # on a GPU machine
    python tools/gpu_latency.py --report-only
    python tools/gpu_latency.py --device cpu --smoke --out /tmp/gpu    # the same code on a CPU, in minutes

On the device machine (no package registry, torch 2.11): run from the working tree with PYTHONPATH=. and
carry tensorly as tools/gpu_batch.sh describes; timm models need timm (and its dependencies) carried too,
and are skipped with a note where it does not import.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

import expkit
from twistc import Pipeline, RunContext, state_of, trace
from twistc.errors import TwistcError
from twistc.latency import paired_medians, paired_speedup, torch_timer
from twistc.models import resnet18, resnet50

log = logging.getLogger("gpu_latency")

LOWER = "lower-conv-tucker{r},lower-conv-svd{r},lower-linear-svd{r},fold,cleanup"
ENGINES = ("eager", "reduce-overhead", "max-autotune")
CELLS = [(model, batch, dtype) for model in ("resnet50", "timm:efficientnet_b0", "timm:vit_tiny_patch16_224")
         for batch in (256, 64, 1) for dtype in ("bfloat16", "float32")]
SMOKE_CELLS = [("resnet18@64", 4, "float32"), ("resnet18@64", 4, "bfloat16")]


def build(name: str) -> tuple[torch.nn.Module, tuple[int, ...], bool]:
    """(model in eval mode, input shape of one sample, whether it is a convnet) for a cell's model name."""
    if name.startswith("timm:"):
        from twistc.models.timm_models import create_model, input_size
        return create_model(name[5:]), input_size(name[5:]), "vit" not in name and "mixer" not in name
    base, _, size = name.partition("@")
    model = {"resnet18": resnet18, "resnet50": resnet50}[base]().eval()
    return model, (3, int(size or 224), int(size or 224)), True


def variants(model, shape, batch, dtype, device, convnet, speedup, reps) -> tuple[dict, dict]:
    """{label: module} of the dense model and its lowered variants, and what each compile recorded."""
    torch.manual_seed(0)
    model = model.to(getattr(torch, dtype))
    example = (torch.randn(1, *shape, dtype=getattr(torch, dtype)),)
    out, info = {"dense": model}, {}
    uniform = LOWER.format(r="{ratio=2,round_to=8}")
    planned = (f"plan-latency{{speedup={speedup:g},runtime=torch,device={device},batch={batch},round_to=8,reps={reps}"
               f",channels_last={str(convnet).lower()},forms=tucker-chain|svd-conv|svd-linear}},{LOWER.format(r='')}")
    for label, spec in (("uniform", uniform), (f"plan {speedup:g}x", planned)):
        start = time.perf_counter()
        try:
            gm = Pipeline.parse(spec).run(trace(model, example), RunContext())
        except TwistcError as e:
            info[label] = {"error": str(e).splitlines()[0]}
            continue
        state = state_of(gm)
        lowered = [r for r in state.layers.values() if r.lowering]
        info[label] = {"seconds": time.perf_counter() - start, "layers_lowered": len(lowered),
                       "weights": [sum(r.before.params for r in lowered), sum(r.current.params for r in lowered)],
                       "predicted_speedup": (state.latency or {}).get("predicted_speedup")}
        out[label] = gm
    return out, info


def engine_timers(modules: dict, shape, batch, dtype, device, convnet, engine) -> dict:
    x = torch.randn(batch, *shape, dtype=getattr(torch, dtype), device=device)
    if convnet:
        x = x.contiguous(memory_format=torch.channels_last)
    timers = {}
    for label, module in modules.items():
        module = module.to(device)
        if convnet:
            module = module.to(memory_format=torch.channels_last)
        run = module if engine == "eager" else torch.compile(module, mode=engine, dynamic=False)
        timers[label] = torch_timer(run, (x,), device, torch.get_num_threads())
    return timers


def run_cell(cell, args, deadline) -> dict:
    name, batch, dtype = cell
    try:
        model, shape, convnet = build(name)
    except (ImportError, ValueError) as e:
        return {"cell": list(cell), "skipped": str(e).splitlines()[0]}
    modules, info = variants(model, shape, batch, dtype, args.device, convnet, args.speedup, args.plan_reps)
    result = {"cell": list(cell), "channels_last": convnet, "compiles": info, "engines": {}, **expkit.metadata()}
    for engine in args.engines.split(","):
        if time.monotonic() > deadline:
            result["engines"][engine] = {"skipped": "time limit"}
            continue
        start = time.perf_counter()
        try:
            timers = engine_timers(modules, shape, batch, dtype, args.device, convnet, engine)
            samples: list[list[float]] = []
            medians = paired_medians(list(timers.values()), warmup=args.warmup, reps=args.reps, samples=samples)
        except Exception as e:  # a variant that does not compile under this engine: recorded, the others go on
            result["engines"][engine] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            continue
        result["engines"][engine] = {
            "seconds": time.perf_counter() - start, "median_ms": dict(zip(timers, medians)),
            "speedup": {label: paired_speedup(samples[0], s) for label, s in zip(list(timers)[1:], samples[1:])}}
        log.info("%s b%d %s %s: %s", name, batch, dtype, engine,
                 ", ".join(f"{k} {v[0]:.2f}x" for k, v in result["engines"][engine]["speedup"].items()))
    return result


def report(store: expkit.RunStore) -> None:
    runs = [r for r in store.load_all() if "engines" in r]
    if not runs:
        return
    rows = []
    for r in runs:
        name, batch, dtype = r["cell"]
        for engine, e in r["engines"].items():
            if "median_ms" not in e:
                rows.append([name, batch, dtype, engine, e.get("skipped") or e.get("error"), "", ""])
                continue
            cells = [f"{v[0]:.2f}x [{v[1][0]:.2f}, {v[1][1]:.2f}]" for v in e["speedup"].values()]
            plan = next((k for k in r["compiles"] if k.startswith("plan")), None)
            if plan and plan not in e["speedup"]:
                cells.append("refused: " + r["compiles"][plan]["error"][:140])
            rows.append([name, batch, dtype, engine, f"{e['median_ms']['dense']:.3f}", *cells])
    md = ["# Low-rank on a GPU: dense against lowered models\n",
          f"{runs[0]['machine'].get('gpu', runs[0]['machine']['cpu'])}; PyTorch {runs[0]['versions']['torch']}. "
          "Uniform: natural forms at ratio 2; plan: plan-latency planned in eager PyTorch in the same setting. "
          "Convnets in channels-last; ranks multiples of 8. Speedup over dense, paired, 95% bootstrap CI.\n",
          expkit.markdown_table(["model", "batch", "dtype", "engine", "dense ms", "uniform", "plan"], rows),
          "\nCommands:\n", *sorted({f"- `{r['command']}`" for r in runs}), ""]
    (store.root / "results.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    p.add_argument("--speedup", type=float, default=1.5, help="plan-latency's target (1.5)")
    p.add_argument("--limit", type=float, default=480, help="seconds; no engine starts after them (480)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--plan-reps", type=int, default=15, help="plan-latency's repetitions per candidate (15)")
    p.add_argument("--out", default=str(expkit.REPO / "results" / "gpu_latency"))
    p.add_argument("--smoke", action="store_true", help="ResNet-18 at 64x64, batch 4, eager only")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.report_only:
        p.error("--device cuda, but torch sees no GPU here; give --device cpu to try it on the CPU")
    cells = SMOKE_CELLS if args.smoke else CELLS
    if args.smoke:
        args.engines, args.reps, args.warmup, args.plan_reps = "eager", 5, 2, 3
    store = expkit.RunStore(Path(args.out))
    deadline = time.monotonic() + args.limit
    for cell in [] if args.report_only else cells:
        rid = f"{cell[0].replace(':', '-').replace('@', '-')}-b{cell[1]}-{cell[2]}-{args.device}"
        if store.done(rid):
            continue
        if time.monotonic() > deadline:
            log.info("time limit: %s and later cells are left for the next run", rid)
            break
        store.save(rid, run_cell(cell, args, deadline))
        report(store)
    report(store)
    return 0


if __name__ == "__main__":
    sys.exit(expkit.resumable(main))
