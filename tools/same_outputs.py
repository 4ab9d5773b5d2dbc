"""Compile the same models with an earlier revision of twistc and with this working tree, and compare what a
user gets: each report.json field by field, and each model.onnx's outputs and stored numbers. A change that
reshapes the code must leave them alone; the differences it means to make are listed, every other one fails.

The earlier revision runs from a temporary git worktree (twistc/passes linked to its passes/ folder, as
the install maps it); this tree runs as installed. Both compile this tree's MODEL.py files. Timings, versions, the machine and paths are not
compared; every compile runs with --no-timing on the same seed.

    python tools/same_outputs.py --before 10b0713
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import expkit

REPO = expkit.REPO
TRAIN = ["--epochs", "1", "--period", "10", "--set", "pretrain_epochs=4"]
CASES = {  # name -> MODEL.py and the flags of its compile
    "digits tucker": ("examples/digits.py", ["--pass", "tucker", "--ratio", "3", "--set", "pretrain_epochs=4"]),
    "digits deeptwist-tucker": ("examples/digits.py", ["--pass", "deeptwist-tucker", "--ratio", "3", *TRAIN]),
    "digits deeptwist-svd tap-major": ("examples/digits.py", ["--pass", "deeptwist-svd", "--ratio", "2",
                                                              "--order", "tap-major", *TRAIN]),
    "digits deeptwist-tiled-svd": ("examples/digits.py", ["--pass", "deeptwist-tiled-svd", "--ratio", "2",
                                                          "--grid", "2x3", *TRAIN]),
    "digits deeptwist-cp": ("examples/digits.py", ["--pass", "deeptwist-cp", "--ratio", "2", "--epochs", "1",
                                                   "--period", "1000", "--set", "pretrain_epochs=4"]),  # ALS is slow
    "digits svd im2col": ("examples/digits.py", ["--pass", "lower-conv-svd{form=im2col,im2col=slices},cleanup",
                                                 "--ratio", "2", "--set", "pretrain_epochs=4"]),
    "digits transformer deeptwist-svd": ("examples/digits_transformer.py",
                                         ["--pass", "deeptwist-svd", "--ratio", "2", "--epochs", "1", "--period", "10",
                                          "--set", "pretrain_epochs=2"]),
    "timm resnet18 tucker": ("examples/timm_model.py", ["--pass", "tucker", "--ratio", "2", "--set", "name=resnet18"]),
}
IGNORED = {"stage_seconds", "phase_seconds", "latency", "versions", "machine", "seconds", "sessions", "created",
           "output", "path", "command", "model_file"}


def flatten(value, prefix="") -> dict:
    """{"a.b[0].c": leaf} for a JSON value, without the IGNORED keys at any depth."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() if key not in IGNORED
                for k, v in flatten(item, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


def report_diffs(before: dict, after: dict) -> list[tuple[str, object, object]]:
    a, b = flatten(before), flatten(after)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if not same(a.get(k), b.get(k))]


def onnx_diff(before: Path, after: Path) -> dict:
    """The largest difference of the two models' outputs on one seeded input, and their stored numbers."""
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (before, after)]
    rng = np.random.default_rng(0)
    feed = {}
    for i in sessions[0].get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    outs = [s.run(None, feed) for s in sessions]
    stored = [sum(numpy_helper.to_array(t).size for t in onnx.load(str(p)).graph.initializer) for p in (before, after)]
    return {"max_abs_diff": max(float(np.abs(x - y).max()) for x, y in zip(*outs)), "stored_before": stored[0],
            "stored_after": stored[1]}


def compile_in(root: Path, env: dict, model: Path, flags: list[str], out: Path) -> float:
    """Compile `model` with the twistc of `root` (its folder is the working directory); returns seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "twistc", "compile", str(model), *flags, "--no-timing", "--quiet",
           "-o", str(out)]
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {root}:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def expected(key: str, allowed: list[str]) -> bool:
    return any(key == a or key.startswith(a + ".") or key.startswith(a + "[") or key.endswith("." + a)
               for a in allowed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="the earlier git revision")
    p.add_argument("--expect", action="append", default=[], metavar="FIELD",
                   help="a report field the change means to change (a key, or the last part of one); repeatable")
    p.add_argument("--only", help="comma-separated case names")
    p.add_argument("--out", default=str(REPO / "results" / "same_outputs"))
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stop still removes the worktree
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only.split(",")}
    out = Path(args.out)
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.before],
                       check=True, capture_output=True)
        try:
            (tree / "twistc" / "passes").symlink_to(tree / "passes")
            old_env = {**os.environ, "PYTHONPATH": str(tree)}
            for name, (model, flags) in cases.items():
                dirs = [Path(tmp) / name.replace(" ", "_") / side for side in ("before", "after")]
                seconds = [compile_in(tree, old_env, REPO / model, flags, dirs[0]),
                           compile_in(REPO, dict(os.environ), REPO / model, flags, dirs[1])]
                reports = [json.loads((d / "report.json").read_text()) for d in dirs]
                diffs = report_diffs(*reports)
                unexpected = [d for d in diffs if not expected(d[0], args.expect)]
                onnx_result = onnx_diff(dirs[0] / "model.onnx", dirs[1] / "model.onnx")
                ok = (not unexpected and onnx_result["max_abs_diff"] <= 1e-5
                      and onnx_result["stored_before"] == onnx_result["stored_after"])
                failures += not ok
                rows.append({"case": name, "model": model, "flags": flags, "ok": ok, "seconds": seconds,
                             "expected_diffs": [d for d in diffs if d not in unexpected],
                             "unexpected_diffs": unexpected, "onnx": onnx_result})
                print(f"{name}: {'same' if ok else 'DIFFERENT'} ({len(diffs) - len(unexpected)} expected "
                      f"differences, {len(unexpected)} others; ONNX outputs within {onnx_result['max_abs_diff']:.1e})",
                      flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    before_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.before], capture_output=True,
                                text=True).stdout.strip()
    write(out, rows, before_rev, args.expect)
    return 1 if failures else 0


def write(out: Path, rows: list[dict], before: str, allowed: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {"before": before, "expected_fields": allowed, "cases": rows, **expkit.metadata()}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    table = [(r["case"], f"`{' '.join(r['flags'])}`", "same" if r["ok"] else "**different**",
              len(r["expected_diffs"]), len(r["unexpected_diffs"]), f"{r['onnx']['max_abs_diff']:.1e}",
              f"{r['onnx']['stored_before']} / {r['onnx']['stored_after']}") for r in rows]
    lines = [f"# The same outputs before ({before}) and after", "",
             f"Every case compiled by revision {before} and by this tree (`--no-timing`), report.json compared field "
             "by field (timings, versions, machine and paths left out), model.onnx run on one seeded input.", "",
             "Fields the change means to change: " + (", ".join(f"`{a}`" for a in allowed) or "none"), "",
             expkit.markdown_table(["case", "flags", "result", "expected field changes", "other field changes",
                                    "ONNX max abs diff", "numbers stored (before / after)"], table), ""]
    for r in rows:
        for key, a, b in r["unexpected_diffs"][:20]:
            lines.append(f"- {r['case']}: `{key}`: {a!r} -> {b!r}")
    examples = {key: (a, b) for r in rows for key, a, b in r["expected_diffs"]}
    if examples:
        lines += ["", "Expected changes, one example of each field:", ""]
        seen = set()
        for key, (a, b) in examples.items():
            field = key.rsplit(".", 1)[-1]
            if field not in seen:
                seen.add(field)
                lines.append(f"- `{key}`: {a!r} -> {b!r}")
    lines += ["", "    python tools/same_outputs.py --before " + before + "".join(f" --expect {a}" for a in allowed), ""]
    (out / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
