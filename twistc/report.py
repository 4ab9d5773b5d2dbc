"""The compile report: report.json for tools, report.md and a terminal table for people."""
from __future__ import annotations

import torch
from torch import nn

from twistc.counting import count_parameters
from twistc.decomp import DECOMPOSITIONS
from twistc.decomp.cost import ConvGeometry
from twistc.machine import cpu_model, versions
from twistc.passes.lower import Lower
from twistc.state import CompileState, Skip
from twistc.trace import UNSUPPORTED_CONVS

COLUMNS = ("layer", "shape", "lowering", "ranks", "params", "MACs", "ratio", "note")


def build_report(state: CompileState, *, pipeline: str, original: nn.Module, compiled: nn.Module,
                 **sections) -> dict:
    """Layers, totals, plan and versions; `sections` (onnx, training, accuracy, ...) are added as given."""
    layers = [record.to_json(state.plan.get(name)) for name, record in state.layers.items()]
    owned = [layer for layer in layers if not layer["shared_with"]]  # a shared weight counts once
    totals = {key: sum(layer[key] for layer in owned) for key in
              ("params_before", "params_after", "macs_before", "macs_after", "flops_before", "flops_after")}
    totals["ratio"] = totals["params_before"] / max(totals["params_after"], 1)
    lowered = [layer for layer in owned if layer["lowering"]]
    compressed_before = sum(layer["params_before"] for layer in lowered)
    compressed_after = sum(layer["params_after"] for layer in lowered)
    report = {
        "pipeline": pipeline,
        "layers": layers,
        "totals": totals,
        "compressed_layers": {"count": len(lowered), "params_before": compressed_before,
                              "params_after": compressed_after,
                              "ratio": compressed_before / compressed_after if compressed_after else None},
        "model": {"params_before": count_parameters(original), "params_after": count_parameters(compiled),
                  "ratio": count_parameters(original) / max(count_parameters(compiled), 1)},
        "leaves": state.leaves,
        "plan": state.plan.to_json(),
        "versions": versions(),
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads()},
    }
    report.update({k: v for k, v in sections.items() if v is not None})
    return report


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _tiles_note(tiles: dict | None) -> str:
    if not tiles or tiles["grid"] == [1, 1]:
        return ""
    note = f"{tiles['grid'][0]}x{tiles['grid'][1]} tiles of {tiles['tile'][0]}x{tiles['tile'][1]}"
    return note + (f", ragged edges {tiles['ragged_edges']}" if tiles["ragged_edges"] else "")


def _latency_note(layer: dict) -> str:
    if layer.get("latency_before") is None:
        return ""
    before, after = 1e3 * layer["latency_before"], 1e3 * layer["latency_after"]
    return f"measured {before:.1f} -> {after:.1f} us, error {layer['approx_error']:.3f}"


def layer_rows(report: dict) -> list[tuple[str, ...]]:
    rows = []
    for layer in report["layers"]:
        shape = "x".join(str(d) for d in layer["shape"])
        ranks = "x".join(str(r) for r in layer["ranks"]) if layer["lowering"] and layer["ranks"] else "-"
        lowering = layer["lowering"] or "-"
        if layer.get("form"):
            lowering += f" ({layer['form']})"
        rows.append((layer["name"], shape, lowering, ranks,
                     f"{_count(layer['params_before'])} -> {_count(layer['params_after'])}",
                     f"{_count(layer['macs_before'])} -> {_count(layer['macs_after'])}",
                     f"{layer['ratio_achieved']:.2f}x",
                     layer["skip_reason"] or _tiles_note(layer.get("tiles")) or _latency_note(layer)
                     or _fit_note(layer)))
    t = report["totals"]
    rows.append(("total (layers)", "", "", "", f"{_count(t['params_before'])} -> {_count(t['params_after'])}",
                 f"{_count(t['macs_before'])} -> {_count(t['macs_after'])}", f"{t['ratio']:.2f}x", ""))
    return rows


def _fit_note(layer: dict) -> str:
    """The output error of a layer fitted to its inputs (or of its kernel fit, measured on them)."""
    if layer.get("output_error") is None:
        return ""
    return f"output error {layer['output_error']:.1%} (fit={layer['fit']})"


def text_table(rows: list[tuple[str, ...]], header=COLUMNS, max_note: int = 60) -> str:
    rows = [tuple(r[:-1]) + (r[-1][:max_note] + ("..." if len(r[-1]) > max_note else ""),) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |" for row in rows]
    return "\n".join(out)


def summary_lines(report: dict) -> list[str]:
    lines = []
    m, c = report["model"], report["compressed_layers"]
    if c["ratio"]:
        lines.append(f"compressed layers: {c['count']}, weights {c['params_before']:,} -> {c['params_after']:,} "
                     f"({c['ratio']:.2f}x)")
    lines.append(f"whole model: stored numbers {m['params_before']:,} -> {m['params_after']:,} ({m['ratio']:.2f}x); "
                 f"MACs of the layers above {report['totals']['macs_before']:,} -> {report['totals']['macs_after']:,}")
    if "training" in report:
        t = report["training"]
        lines.append(f"training: {t['epochs']} epochs, {t['steps']} steps, {t['distortions']} distortions, "
                     f"{t['final_projections']} final projections, {t['seconds']:.0f}s")
        phases = t.get("phases") or []
        if len(phases) > 1:
            lines.append("one training in {} phases: {}".format(len(phases), "; then ".join(
                f"{p['stage']} ({p['steps']} steps, {p['seconds']:.0f}s)" for p in phases)))
        if t.get("teacher_seconds"):
            lines.append(f"distillation: the teacher's forwards took {t['teacher_seconds']:.0f}s of {t['seconds']:.0f}s "
                         f"of training ({t['teacher_seconds'] / max(t['seconds'], 1e-9):.0%})")
        if len(t.get("sessions") or []) > max(len(phases), 1):  # resumed, perhaps elsewhere
            lines.append("trained in {} sessions: {}".format(len(t["sessions"]), "; ".join(
                f"steps {s['steps'][0]}-{s['steps'][1]} on {s['hardware']} ({s['device']}, {s['seconds']:.0f}s)"
                for s in t["sessions"])))
        if t.get("distortion_changes"):
            c = t["distortion_changes"]
            lines.append(f"the first distortion removed {c[0]:.1%} of a kernel's norm on average, the last {c[-1]:.1%}")
        if t.get("adaptive_periods"):
            p = sorted(t["adaptive_periods"])
            lines.append(f"adaptive S_D at the end of training: {p[0]} to {p[-1]} steps (median {p[len(p) // 2]}) "
                         f"over {len(p)} layers")
        if t.get("evaluations"):
            e = t["evaluations"][-1]
            low_rank = f", {e['low_rank_accuracy']:.2%} low-rank" if e.get("low_rank_accuracy") is not None else ""
            lines.append(f"accuracy during training: {e['accuracy']:.2%} after epoch {e['epoch']}{low_rank} "
                         f"({len(t['evaluations'])} evaluations)")
        if t.get("kept_epoch"):
            lines.append(f"kept the weights of epoch {t['kept_epoch']}, the best evaluation (keep_best)")
        if t.get("accuracy_before_final_projection") is not None:
            lines.append(f"accuracy just before the final projection: {t['accuracy_before_final_projection']:.2%}")
    changes = {l["name"]: l["final_projection_change"] for l in report["layers"]
               if l.get("final_projection_change") is not None}
    if changes:
        worst = max(changes, key=changes.get)
        lines.append(f"the final projection removed {sum(changes.values()) / len(changes):.2%} of a kernel's norm "
                     f"on average (most: {changes[worst]:.2%}, {worst})")
    if "accuracy" in report:
        a = report["accuracy"]
        lines.append(f"accuracy: before {a['before']:.2%}, after {a['after']:.2%}")
    if "latency" in report:
        lines.append(latency_line(report["latency"]))
        d = report["latency"].get("accuracy_drop")
        if d:
            lines.append(f"the plan's accuracy drop before training (every chosen layer approximated, "
                         f"{d['samples']:,} samples of eval_data()): {d['measured']:.2%}, at most {d['max']:.2%}")
    if "onnx" in report:
        o = report["onnx"]
        copy = (f", a {o['dtype']} copy of the {o['model_dtype']} model (onnxruntime has no {o['model_dtype']} Conv)"
                if o.get("dtype", "float32") != o.get("model_dtype", "float32") else "")
        scale = f" of the largest |output| {o['scale']:.2g}" if "scale" in o else ""
        lines.append(f"ONNX check (onnxruntime vs PyTorch, atol={o['atol']:g}{scale}, rtol={o['rtol']:g}{copy}): "
                     f"max |diff| {o['max_abs_diff']:.2e}, " + ("; ".join(o["warnings"]) if o.get("warnings")
                                                                else "ok"))
    return lines


def latency_line(latency: dict) -> str:
    r = latency["runtime"]
    where = (f"{r['runtime']} {r['device']} ({r['machine']}), {r['threads']} thread{'s' * (r['threads'] > 1)}, "
             f"batch {r['batch']}")
    parts = []
    if "predicted_speedup" in latency:  # plan-latency's prediction
        parts.append(f"predicted {latency['model_ms_before']:.3f} -> {latency['predicted_ms_after']:.3f} ms "
                     f"({latency['predicted_speedup']:.2f}x)")
    m = latency.get("measured")
    if m:
        lo, hi = m["speedup_ci95"]
        trust = (f"95% CI {lo:.2f}-{hi:.2f}" if m.get("trustworthy", True)
                 else "NOT TRUSTWORTHY: " + "; ".join(m["problems"]))
        parts.append(f"measured medians {m['before_ms']:.3f} -> {m['after_ms']:.3f} ms ({m['speedup']:.2f}x, {trust})")
    return f"latency in {where}: " + ", ".join(parts)


def markdown(report: dict) -> str:
    parts = ["# twistc compile report\n", f"Pipeline: `{report['pipeline']}`\n"]
    parts += [f"- {line}" for line in summary_lines(report)]
    parts += ["", markdown_table(COLUMNS, layer_rows(report)), ""]
    evaluations = (report.get("training") or {}).get("evaluations")
    if evaluations:
        parts += ["Training, evaluated on eval_data() (low-rank: every projected kernel replaced by its low-rank "
                  "reconstruction, as the final projection would):", ""]
        kept = report["training"].get("kept_epoch")
        parts += [markdown_table(["epoch", "train loss", "accuracy", "low-rank accuracy"], [
            [f"{e['epoch']} (kept)" if e["epoch"] == kept else e["epoch"], f"{e['loss']:.4f}", f"{e['accuracy']:.2%}",
             "-" if e.get("low_rank_accuracy") is None else f"{e['low_rank_accuracy']:.2%}"] for e in evaluations]), ""]
    if report["leaves"]:
        parts += ["Untraceable submodules kept as leaves:", ""]
        parts += [f"- `{k}`: {v}" for k, v in report["leaves"].items()] + [""]
    v = report["versions"]
    parts.append(f"torch {v['torch']}, onnx {v['onnx']}, onnxruntime {v['onnxruntime']}; {report['machine']['cpu']}")
    return "\n".join(parts) + "\n"


def support_table() -> str:
    """Layer kinds x decompositions as a markdown table of the forms each kind can take, and the one the `lower`
    pass gives it when it chooses (derived from twistc.decomp.FORMS)."""
    kinds = {"Conv2d, kh x kw > 1, groups=1": ConvGeometry(8, 8, (3, 3)), "Conv2d 1x1": ConvGeometry(8, 8, (1, 1)),
             "Conv2d grouped or depthwise": ConvGeometry(8, 8, (3, 3), groups=8),
             "Conv1d, k > 1, groups=1": ConvGeometry(8, 8, (3, 1), kind="Conv1d"),
             "Linear (nn.Linear, F.linear or x @ W.T on a parameter)": ConvGeometry(8, 8, (1, 1), kind="Linear")}
    lower, rows = Lower(), []
    for kind, g in kinds.items():
        chosen = lower.decomp_for(g)
        default = "dense" if isinstance(chosen, Skip) else f"`{lower.form_for(chosen, g.kind)}`"
        cells = []
        for d in DECOMPOSITIONS.values():
            reason = d.skip_reason(g)
            forms = ", ".join(f"`{f.name}`" for f in d.forms if g.kind in f.kinds)
            cells.append(f"skipped: {reason}" if reason else forms)
        rows.append(f"| {kind} | {default} | " + " | ".join(cells) + " |")
    others = ", ".join(c.__name__ for c in UNSUPPORTED_CONVS)
    rows.append(f"| {others} | dense | " + " | ".join("skipped; the report names the layer kind" for _ in DECOMPOSITIONS)
                + " |")
    rows.append("| Linear layers inside nn.MultiheadAttention | dense | " + " | ".join(
        "skipped: it runs as one fused call" for _ in DECOMPOSITIONS) + " |")
    header = "| layer | by default | " + " | ".join(f"`{name}`" for name in DECOMPOSITIONS) + " |"
    return "\n".join([header, "|" + "---|" * (len(DECOMPOSITIONS) + 2), *rows])
