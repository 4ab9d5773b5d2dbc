"""The model zoo: the networks people deploy, compiled by twistc as a user would, with the same commands.

Each timm architecture (random weights, its default input size, batch 1) is compiled through
examples/timm_model.py by `twistc compile` in a subprocess, with the `tucker` preset (Tucker-2 for kxk
convs, SVD pairs for 1x1 convs and Linear layers) and `--epochs 0`:

  ratio2      --ratio 2                     uniform: every layer some form compresses, at half its weights
  speedup S   --target-speedup S            the latency plan, S = 1.25, 1.5, 2

in onnxruntime on the CPU with `--threads` (1) timing threads. Per run it records which layers were
lowered by kind, the weights and MACs cut, the predicted and measured speedup (paired, with its 95% CI
and whether the timing was trustworthy), the compile's and the planning's seconds (the first plan of a
model runs on a cold latency cache, the later ones reuse its timings), and for a refusal its message,
which names what caps the speed. Measure on a quiet machine: pause other work first.

    python tools/zoo.py                              # every model and setting, skipping finished runs
    python tools/zoo.py --models resnet18 --settings ratio2,speedup1.5
    python tools/zoo.py --report-only
    python tools/zoo.py --smoke --out /tmp/zoo       # two small models, ratio2 and speedup1.5

Needs timm (`pip install 'twistc[timm]' && pip install --no-deps 'timm>=1.0'`; torchvision is not needed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import expkit

MODELS = {  # label: timm architecture
    "ResNet-18": "resnet18", "ResNet-50": "resnet50", "MobileNetV2": "mobilenetv2_100",
    "MobileNetV3-L": "mobilenetv3_large_100", "EfficientNet-B0": "efficientnet_b0", "RegNetY-800MF": "regnety_008",
    "ConvNeXt-Atto": "convnext_atto", "DenseNet-121": "densenet121", "ViT-Tiny": "vit_tiny_patch16_224",
    "DeiT-Tiny": "deit_tiny_patch16_224", "Mixer-S/16": "mixer_s16_224",
}
SMOKE_MODELS = {"MobileNetV3-S-0.5": "mobilenetv3_small_050", "ResNet-10t": "resnet10t"}
SETTINGS = {"ratio2": ["--ratio", "2"], "speedup1.25": ["--target-speedup", "1.25"],
            "speedup1.5": ["--target-speedup", "1.5"], "speedup2": ["--target-speedup", "2"]}
GOAL_PLAN_SECONDS = 45  # planning a zoo model on a cold cache, 2 quiet cores
MET = 0.95  # a target counts as met when the measured speedup is within 5% of it


def kind_of(layer: dict) -> str:
    if layer["kind"] == "Linear":
        return "Linear"
    if layer["groups"] > 1:
        return "depthwise" if layer["shape"][1] == 1 else "grouped"
    return "1x1 conv" if all(k == 1 for k in layer["shape"][2:]) else "kxk conv"


def summarise(report: dict) -> dict:
    """What a zoo table needs from a compile's report.json."""
    kinds: dict[str, Counter] = {}
    for layer in report["layers"]:
        kinds.setdefault(kind_of(layer), Counter())["lowered" if layer["lowering"] else "dense"] += 1
    latency, totals = report.get("latency", {}), report["totals"]
    measured = latency.get("measured", {})
    return {
        "kinds": {k: dict(v) for k, v in kinds.items()},
        "compressed_weights": [report["compressed_layers"]["params_before"], report["compressed_layers"]["params_after"]],
        "compressible_weights": sum(l["params_before"] for l in report["layers"] if l["groups"] == 1),
        "model_ratio": report["model"]["ratio"], "macs": [totals["macs_before"], totals["macs_after"]],
        "predicted_speedup": latency.get("predicted_speedup"), "measured_speedup": measured.get("speedup"),
        "measured_ci95": measured.get("speedup_ci95"), "trustworthy": measured.get("trustworthy"),
        "problems": measured.get("problems"),
        "plan_seconds": next((s for k, s in report.get("stage_seconds", {}).items() if k.startswith("plan-latency")),
                             None),
        "onnx_max_diff": report["onnx"]["max_abs_diff"], "onnx_scale": report["onnx"].get("scale"),
    }


def compile_run(label: str, setting: str, args, cache: Path, workdir: Path) -> dict:
    command = [sys.executable, "-m", "twistc", "compile", str(expkit.REPO / "examples" / "timm_model.py"),
               "--set", f"name={MODELS.get(label) or SMOKE_MODELS[label]}", "--pass", "tucker", "--epochs", "0",
               "--threads", str(args.threads), "-o", str(workdir), "--force", "--quiet", *SETTINGS[setting]]
    if "--target-speedup" in command:
        command += ["--latency-cache", str(cache)]
    cold = not cache.exists()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - start
    lines = done.stderr.splitlines()
    result = {"model": label, "setting": setting, "rc": done.returncode, "seconds": seconds, "cold_cache": cold,
              "compile": " ".join(["twistc"] + command[3:]).replace(str(expkit.REPO) + "/", ""),
              "warnings": [l for l in lines if "warning:" in l], **expkit.metadata()}
    if done.returncode == 0:
        result.update(summarise(json.loads((workdir / "report.json").read_text())))
    else:
        result["error"] = next((l for l in reversed(lines) if l.startswith("twistc: error")), lines[-1] if lines else "")
    return result


def cap(r: dict) -> str:
    """What held the speed: a refusal's numbers, a missed target, or the run's first warning."""
    if r["rc"] != 0:
        m = re.search(r"(the fastest candidates|the best plan).*?gives? (\S+x).*?(\d+%) of the model's time is "
                      r"outside.*?at most (\S+x)", r["error"])
        what = "its plan timed whole gives" if m and m.group(1) == "the best plan" else "candidates give"
        return (f"refused: {what} {m.group(2)}; {m.group(3)} of the time in layers no form speeds up "
                f"(at most {m.group(4)})" if m else r["error"].removeprefix("twistc: error: ")[:200])
    target = float(r["setting"].removeprefix("speedup")) if r["setting"].startswith("speedup") else None
    if target and r["measured_speedup"] < MET * target:
        return f"missed: {r['measured_speedup']:.2f}x measured for {target:g}x"
    return r["warnings"][0].split("warning: ", 1)[-1][:120] if r["warnings"] else "-"


def report(store: expkit.RunStore) -> None:
    runs = store.load_all()
    if not runs:
        return
    order = {m: i for i, m in enumerate([*MODELS, *SMOKE_MODELS])}
    rows = []
    cpus = Counter(r["machine"]["cpu"] for r in runs)
    cpu = cpus.most_common(1)[0][0]  # the machine most runs were timed on; the others are named in their rows
    for r in sorted(runs, key=lambda r: (order.get(r["model"], 99), list(SETTINGS).index(r["setting"]))):
        if r["rc"] != 0:
            rows.append([r["model"], r["setting"], "-", "-", "-", "-", "-", f"{r['seconds']:.0f}", cap(r)])
            continue
        lowered = ", ".join(f"{k} {v.get('lowered', 0)}/{sum(v.values())}" for k, v in sorted(r["kinds"].items()))
        before, after = r["compressed_weights"]
        ci = r["measured_ci95"]
        measured = (f"{r['measured_speedup']:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-") + \
                   ("" if r["trustworthy"] in (True, None) else " (unsteady)") + \
                   ("" if r["machine"]["cpu"] == cpu else f" on {r['machine']['cpu']}")
        rows.append([r["model"], r["setting"], lowered, f"{before / after:.2f}x" if after else "-",
                     f"{r['macs'][0] / r['macs'][1]:.2f}x",
                     f"{r['predicted_speedup']:.2f}x" if r["predicted_speedup"] else "-", measured,
                     f"{r['seconds']:.0f}" + (f" (plan {r['plan_seconds']:.0f}{', cold' if r['cold_cache'] else ''})"
                                             if r["plan_seconds"] else ""), cap(r)])
    md = ["# The model zoo: timm networks compiled by twistc\n",
          "Random weights, the architecture's default input size, batch 1; `--pass tucker --epochs 0`, timed in "
          f"onnxruntime on {cpu}{' (a row that names another machine ran there)' if len(cpus) > 1 else ''} with "
          "the stated threads (paired medians, 95% bootstrap CI). "
          "Lowered: layers lowered / layers of that kind. Weights: the cut of the compressed layers' weights. "
          "MACs: of all conv and Linear layers.\n",
          expkit.markdown_table(["model", "setting", "lowered (by kind)", "weights", "MACs", "predicted", "measured",
                                 "seconds", "what capped it / warnings"], rows),
          "\nCommands: the tool's, then one compile of each setting (each run's JSON has its own):\n",
          *sorted({f"- `{r['command']}`" for r in runs}),
          *sorted({f"- `{r['compile']}`" for r in runs if r["model"] == runs[0]["model"]}), ""]
    (store.root / "results.md").write_text("\n".join(md) + "\n")
    (store.root / "results.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", help=f"comma-separated labels or timm names (default: all: {', '.join(MODELS)})")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for every timing (1)")
    p.add_argument("--out", default=str(expkit.REPO / "results" / "zoo"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--smoke", action="store_true", help="two small models, ratio2 and speedup1.5")
    args = p.parse_args(argv)
    if args.smoke:
        MODELS.clear()
        MODELS.update(SMOKE_MODELS)
        args.settings = "ratio2,speedup1.5"
    by_timm = {v: k for k, v in MODELS.items()}
    labels = [by_timm.get(m, m) for m in args.models.split(",")] if args.models else list(MODELS)
    unknown = [m for m in labels if m not in MODELS] + [s for s in args.settings.split(",") if s not in SETTINGS]
    if unknown:
        p.error(f"unknown models or settings: {', '.join(unknown)} (models: {', '.join(MODELS)}; "
                f"settings: {', '.join(SETTINGS)})")
    store = expkit.RunStore(Path(args.out))
    work = expkit.CHECKPOINTS / "zoo"
    for label in [] if args.report_only else labels:
        cache = work / "caches" / f"{MODELS[label]}-t{args.threads}.json"
        for setting in args.settings.split(","):
            rid = f"{MODELS[label]}-{setting}-t{args.threads}"
            if store.done(rid):
                continue
            result = compile_run(label, setting, args, cache, work / "out" / rid)
            store.save(rid, result)
            print(f"{label} {setting}: rc {result['rc']}, {result['seconds']:.0f} s, "
                  f"measured {result.get('measured_speedup') or '-'}", flush=True)
            report(store)
    report(store)
    return 0


if __name__ == "__main__":
    sys.exit(expkit.resumable(main))
