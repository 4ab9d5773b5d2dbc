"""Do layers save inside the whole model what they save timed alone? plan-latency's prediction rests on it.

ResNet-50 at 224 (seeded random weights) is planned with `plan-latency{speedup=S}` in onnxruntime
(CPU, batch 1, 1 thread; the latency cache makes a rerun cheap). Then the N layers with the largest
measured savings are lowered one at a time, each into a copy of the dense model, and all of these
models, the dense one and the whole plan are timed round-robin in one process. A layer's saving in
context is the dense model's median minus the median of the model with only that layer lowered.

    python tools/latency_in_context.py                  # S = 2, N = 10, 20 repetitions
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

import expkit

from twistc import Pipeline, state_of, trace
from twistc.latency import onnx_bytes, ort_timer, paired_medians
from twistc.models import resnet50
from twistc.plan import Plan

log = logging.getLogger("latency_in_context")
LOWER = "lower,cleanup"


def lowered(model: torch.nn.Module, x: torch.Tensor, plan: Plan) -> torch.nn.Module:
    gm = trace(model, (x,))
    state_of(gm).plan = plan
    return Pipeline.parse(LOWER).run(gm)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--latency-cache", default=str(expkit.CHECKPOINTS.parent / "latency.json"))
    p.add_argument("--out", default=str(expkit.REPO / "results" / "latency_in_context"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = resnet50().eval(), torch.randn(1, 3, 224, 224)
    spec = f"plan-latency{{speedup={args.speedup:g},runtime=ort,device=cpu,threads=1,batch=1,cache={args.latency_cache}}}"
    planned = Pipeline.parse(spec).run(trace(model, (x,)))
    state = state_of(planned)
    records = {n: r for n, r in state.layers.items() if r.latency_before is not None}
    saving = {n: r.latency_before - r.latency_after for n, r in records.items()}
    top = sorted((n for n in saving if saving[n] > 0), key=saving.get, reverse=True)[: args.layers]
    models = [model] + [lowered(model, x, Plan.from_json({n: state.plan.get(n).to_json()})) for n in top]
    models.append(lowered(model, x, state.plan))
    log.info("timing %d models round-robin", len(models))
    medians = paired_medians([ort_timer(m, x, "cpu", 1, onnx_bytes(m.eval(), x)) for m in models],
                             warmup=3, reps=args.reps)
    dense, whole = medians[0], medians[-1]
    rows = [{"layer": n, "form": state.plan.get(n).lowering, "ranks": list(state.plan.get(n).ranks),
             "dense_alone_ms": records[n].latency_before, "lowered_alone_ms": records[n].latency_after,
             "saving_alone_ms": saving[n], "saving_in_model_ms": dense - ms} for n, ms in zip(top, medians[1:-1])]
    out = {"model": "resnet50", "input": [1, 3, 224, 224], "runtime": "ort cpu, 1 thread, batch 1",
           "spec": spec, "reps": args.reps, "dense_model_ms": dense, "planned_model_ms": whole,
           "convs_alone_sum_ms": sum(r.latency_before for r in records.values()),
           "predicted_speedup": state.latency["predicted_speedup"], "measured_speedup": dense / whole,
           "plan_saving_alone_ms": sum(v for v in saving.values() if v > 0), "plan_saving_in_model_ms": dense - whole,
           "layers": rows, "command": "python " + " ".join(sys.argv), **expkit.metadata()}
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    table = expkit.markdown_table(
        ["layer", "form", "ranks", "dense alone ms", "lowered alone ms", "saving alone ms", "saving in the model ms"],
        [[r["layer"], r["form"], "x".join(map(str, r["ranks"])), f"{r['dense_alone_ms']:.3f}",
          f"{r['lowered_alone_ms']:.3f}", f"{r['saving_alone_ms']:.3f}", f"{r['saving_in_model_ms']:.3f}"]
         for r in rows])
    (folder / "results.md").write_text("\n".join([
        "# Layer savings alone and inside the whole model (ResNet-50 @224)\n",
        f"onnxruntime CPU, 1 thread, batch 1, {args.reps} round-robin repetitions; plan `{spec}`.\n",
        f"- the {len(records)} layers timed alone sum to {out['convs_alone_sum_ms']:.2f} ms; the dense model "
        f"takes {dense:.2f} ms",
        f"- the whole plan: predicted {out['predicted_speedup']:.3f}x, measured {out['measured_speedup']:.3f}x; its "
        f"layers save {out['plan_saving_alone_ms']:.2f} ms timed alone and {out['plan_saving_in_model_ms']:.2f} ms "
        "in the model",
        f"- the {len(rows)} largest savers, summed: {sum(r['saving_alone_ms'] for r in rows):.2f} ms alone, "
        f"{sum(r['saving_in_model_ms'] for r in rows):.2f} ms in the model\n",
        table, "", f"Command: `{out['command']}` on {out['machine']['cpu']}", ""]))
    log.info("wrote %s", folder / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
