"""The `twistc` command: compile, passes, bench.

Errors the user can fix are printed as one line (`twistc: error: ...`) with exit status 2; outputs
are written into a temporary directory beside OUTDIR and moved into place only when complete.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import typing
from pathlib import Path

import torch

from twistc import checkpoint, distributed
from twistc.bench import bench, session
from twistc.errors import SpecError, Stopped, TwistcError, first_line
from twistc.export import export_onnx, save_program
from twistc.files import WRITE_ERRNOS, check_distinct, check_writable
from twistc.latency import Runtime, compare_models, model_timer
from twistc.latency_cache import LatencyCache
from twistc.modelfile import load_model_file
from twistc.outdir import OutputDir, check_output
from twistc.pipeline import (PRESETS, Pipeline, RunContext, describe, expand_presets, format_value, parse_item,
                             split_items, stage_class)
from twistc.plan import DEFAULT_RATIO, Plan
from twistc.report import build_report, layer_rows, markdown, summary_lines, text_table
from twistc.selection import name_list
from twistc.state import state_of
from twistc.trace import trace
from twistc.train import accuracy

log = logging.getLogger(__name__)

OUTPUTS = ("original.onnx", "model.onnx", "model.pt2", "report.json", "report.md")


class _Parser(argparse.ArgumentParser):
    """argparse with twistc's one-line errors instead of a usage block."""

    def error(self, message: str):
        print(f"twistc: error: {message} (`{self.prog} --help` lists the options)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="twistc", description="Compile CNNs into low-rank form (DeepTwist, Tucker).")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    debug = argparse.ArgumentParser(add_help=False)  # --debug after the command too
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", parents=[debug], help="trace MODEL.py, run a pass pipeline, export and check ONNX")
    c.add_argument("model", help="MODEL.py defining model(), example_inputs() [, train_data(), eval_data()]")
    c.add_argument("--pass", dest="pipeline", default="deeptwist-tucker",
                   help="pipeline spec or preset (see `twistc passes`); default deeptwist-tucker")
    c.add_argument("--ratio", type=float, default=DEFAULT_RATIO,
                   help=f"per-layer weight compression ratio (> 1) for passes that choose ranks ({DEFAULT_RATIO:g})")
    c.add_argument("--epochs", type=int, help="epochs of the train stage")
    c.add_argument("--period", type=int, default=200, help="DeepTwist S_D: steps between projections (200)")
    c.add_argument("--lr", type=float, help="learning rate of the train stage")
    c.add_argument("--order", choices=("channel-major", "tap-major"),
                   help="column order of the lowered matrix for svd and tiled-svd (channel-major)")
    c.add_argument("--tile", type=_pair, metavar="HxW", help="tile shape for tiled-svd, e.g. 64x64")
    c.add_argument("--grid", type=_pair, metavar="RxC", help="tile grid for tiled-svd, e.g. 1x9")
    c.add_argument("--seed", type=int, help="seed of the train stage")
    c.add_argument("--fit", choices=("weight", "activation"),
                   help="what the factors are fitted to: weight (the kernel) or activation (each layer's output on "
                        "batches of train_data(), else eval_data(), that a calibrate stage put in front collects)")
    c.add_argument("--calib-batches", type=int, metavar="N", help="batches calibrate collects on (16)")
    c.add_argument("--handoff", type=float, metavar="F",
                   help="DeepTwist presets: spend the fraction F of the epochs training in the original shape, then "
                        "lower and train the factors for the rest, on one learning-rate schedule")
    c.add_argument("--distill", type=float, metavar="W",
                   help="train stages: weight in [0, 1] of knowledge distillation from the original model "
                        "(train{distill=W}; 0: labels only)")
    c.add_argument("--plan", help="plan JSON (or a report.json) whose per-layer entries override pass options")
    c.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="option passed to MODEL.py functions that take KEY (repeatable)")
    c.add_argument("--option", dest="stage_options", action="append", default=[], metavar="KEY=VALUE",
                   help="option for every stage of the pipeline that has KEY and whose spec does not write it, "
                        "e.g. --option accumulate=4 --option eval_every=1 for the train stage of a preset "
                        "(repeatable)")
    c.add_argument("--atol", type=float, help="ONNX check absolute tolerance (1e-4; 1e-2 for a float16 model)")
    c.add_argument("--rtol", type=float, help="ONNX check relative tolerance (1e-4; 1e-2 for a float16 model)")
    c.add_argument("--threads", type=int, help="torch threads")
    c.add_argument("--no-timing", action="store_true",
                   help="do not time the compiled model against the original after compiling (in plan-latency's "
                        "runtime after it, else in onnxruntime on the CPU at batch 1 with --threads, default 1)")
    c.add_argument("--device", default="auto",
                   help="where the train stage runs: cpu, cuda, cuda:N, or auto (cuda when torch sees one)")
    target = c.add_mutually_exclusive_group()
    target.add_argument("--target-speedup", type=float, metavar="S",
                        help="tucker and deeptwist-tucker: choose each layer's form and ranks by measured latency so "
                             "that the model runs S times faster (plan-latency{speedup=S}; --threads sets its thread "
                             "count)")
    target.add_argument("--max-drop", type=float, metavar="D",
                        help="tucker and deeptwist-tucker: the fastest forms and ranks whose accuracy on eval_data() "
                             "before fine-tuning is at most D (a fraction) below the original's "
                             "(plan-latency{max_drop=D})")
    c.add_argument("--latency-cache", metavar="PATH",
                   help="latency cache of plan-latency (default: ~/.cache/twistc/latency.json)")
    c.add_argument("--checkpoint", metavar="DIR",
                   help="save training checkpoints in DIR (each epoch end, and on Ctrl-C or SIGTERM)")
    c.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also save a checkpoint after every STEPS optimizer steps (a kill without a signal, "
                        "such as a node failure, then loses at most STEPS steps)")
    c.add_argument("--resume", action="store_true", help="continue training from the checkpoint in --checkpoint DIR")
    c.add_argument("-o", "--output", default="twistc-out", help="output directory (default twistc-out)")
    c.add_argument("--force", action="store_true", help="replace an earlier twistc output directory")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    ps = sub.add_parser("passes", parents=[debug],
                        help="list passes, stages and presets; with NAME, that pass's options")
    ps.add_argument("name", nargs="?", help="a pass or stage, e.g. plan-latency")

    e = sub.add_parser("eval", parents=[debug],
                       help="top-1 accuracy of an ONNX file in onnxruntime on MODEL.py's eval_data()")
    e.add_argument("model", help="MODEL.py defining eval_data()")
    e.add_argument("onnx", help="the ONNX file, e.g. twistc-out/model.onnx")
    e.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="option passed to MODEL.py functions that take KEY (repeatable)")
    e.add_argument("--threads", type=int, default=1)

    b = sub.add_parser("bench", parents=[debug],
                       help="time ONNX models in onnxruntime (or .pt2 programs in PyTorch), side by side",
                       description="Times the models round-robin (one run of each per repetition). Columns: the "
                                   "median and the 10th-90th percentiles of each model's run time, and its speedup "
                                   "over the first model (the ratio of their medians) with a 95% interval from a "
                                   "bootstrap over the paired repetitions. Timings whose paired ratios spread or drift "
                                   "too much, or taken on a busy machine, are measured three times as long; if that "
                                   "does not steady them, the interval is replaced by '(unsteady)' and a warning.")
    b.add_argument("models", nargs="+", help="ONNX files (.pt2 programs with --runtime torch or torch-compile); "
                                             "ratios are relative to the first")
    b.add_argument("--runtime", choices=("ort", "torch", "torch-compile"), default="ort",
                   help="ort: onnxruntime; torch: PyTorch eager on the model.pt2 programs, CUDA timed with events; "
                        "torch-compile: the programs under torch.compile (CUDA graphs on CUDA)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="execution provider (the device under --runtime torch and torch-compile); "
                        "auto: cuda when available, else cpu")
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--reps", type=int, default=50)
    b.add_argument("--spin", action="store_true",
                   help="let onnxruntime's idle threads spin (off by default: with several models timed in turn, "
                        "each model's spinning threads steal the cores of the next)")
    b.add_argument("-o", "--output", help="write the results as JSON here")
    return p


def _pair(text: str) -> tuple[int, int]:
    try:
        h, w = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 16x16, got {text!r}") from None
    return h, w


def _options(pairs: list[str], flag: str = "--set") -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise SpecError(f"{flag} {pair!r}: write KEY=VALUE")
        out[key] = value
    return out


def build_pipeline(spec: str, args) -> Pipeline:
    """The pipeline from --pass; the other flags fill options the spec does not write. Passes after one
    that writes the plan (deeptwist, plan-latency) take ranks, order and tiles from it, so those flags
    skip them."""
    stages, planned = [], False
    extra = _options(args.stage_options, "--option")
    target = ({"speedup": args.target_speedup} if args.target_speedup is not None else
              {"max_drop": args.max_drop} if args.max_drop is not None else None)
    items = split_items(expand_presets(spec, args.epochs, target, args.handoff))
    if args.fit == "activation" and not any(i.startswith("calibrate") for i in items):
        items.insert(0, "calibrate")
    for text in items:
        values = {"epochs": args.epochs, "lr": args.lr, "seed": args.seed, "period": args.period,
                  "threads": args.threads, "cache": args.latency_cache, "distill": args.distill, "fit": args.fit,
                  "batches": args.calib_batches, **extra}
        if not planned:
            values.update(order=args.order, tile=args.tile, grid=args.grid, ratio=args.ratio)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        if device != "cpu" and not text.startswith("plan-latency"):  # plan-latency's device is where it measures
            values["device"] = device
        stage = parse_item(text, values)
        stages.append(stage)
        planned |= stage.writes_plan
    unused = [k for k in extra if not any(k in {f.name for f in dataclasses.fields(s)} for s in stages)]
    if unused:
        raise SpecError(f"--option {unused[0]}: no stage of the pipeline ({', '.join(s.name for s in stages)}) "
                        f"takes '{unused[0]}'; `twistc passes NAME` lists a stage's options")
    return Pipeline(stages)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _status(msg: str) -> None:
    """What twistc is doing now, on a terminal's stderr (nothing when stderr is a file or pipe)."""
    if sys.stderr.isatty():
        print(f"twistc: {msg}", file=sys.stderr, flush=True)


def compile_command(args) -> int:
    distributed.init_from_env()  # under torchrun: join the other ranks
    model_path = Path(args.model).resolve()
    out = Path(args.output)
    if args.threads is not None:
        if args.threads < 1:
            raise SpecError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    pipeline = build_pipeline(args.pipeline, args)
    pipeline.check_whole()
    if args.resume and not args.checkpoint:
        raise SpecError("--resume needs --checkpoint DIR, the folder the stopped run saved into")
    if args.checkpoint_every < 0 or (args.checkpoint_every and not args.checkpoint):
        raise SpecError(f"--checkpoint-every must be >= 1 and comes with --checkpoint DIR, got {args.checkpoint_every}")
    plan = Plan.load(args.plan) if args.plan else None
    check_output(out, model_path, args.force, OUTPUTS)
    _check_paths(args, pipeline, model_path, out)
    mf = load_model_file(model_path, _options(args.options))
    missing = [f"{name}()" for name in pipeline.needs() if not mf.has(name)]
    if missing:
        raise SpecError(f"pipeline '{pipeline}' uses {' and '.join(missing)}, which {model_path.name} does not define")
    main_rank = distributed.is_main()
    if main_rank:
        _say(f"pipeline: {pipeline}")
    if main_rank and not args.quiet:  # a line per epoch: loss, and the evaluations of eval_every
        logging.getLogger("twistc.train").setLevel(logging.INFO)
    status = _status if main_rank and not args.quiet else (lambda msg: None)
    status(f"building the model ({model_path.name}: model())")
    original = mf.model().eval()
    example = mf.example_inputs()
    eval_data = mf.data("eval_data")  # the ranks share evaluations during training; rank 0 alone does the rest
    start = time.perf_counter()
    if eval_data:
        status("evaluating the original model on eval_data()")
    acc_before = accuracy(original, eval_data()) if eval_data and main_rank else None
    status("tracing")
    gm = trace(copy.deepcopy(original), example)
    state = state_of(gm)
    if plan is not None:
        unknown = sorted(set(plan.layers) - set(state.layers))
        if unknown:
            raise SpecError(f"plan {args.plan} names layers the model does not have ({name_list(unknown, 5)}); "
                            f"its convs are: {name_list(list(state.layers))}")
        state.plan = plan
    ctx = RunContext(mf.data("train_data"), eval_data, progress=main_rank and not args.quiet,
                     checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume,
                     status=status,
                     train_data_sharded=mf.takes("train_data", "rank") and mf.takes("train_data", "world_size"))
    if not main_rank:  # the other ranks train alongside; rank 0 exports and writes
        pipeline.run(gm, ctx)
        return 0
    writer = OutputDir(out, model_path, args.force)
    with writer as tmp:
        status("exporting original.onnx and checking it in onnxruntime")
        export_onnx(original, example, tmp / "original.onnx", args.atol, args.rtol)
        gm = pipeline.run(gm, ctx)
        gm.eval()
        status("exporting model.onnx and checking it in onnxruntime")
        check = export_onnx(gm, example, tmp / "model.onnx", args.atol, args.rtol)
        save_program(gm, example, tmp / "model.pt2")
        latency = _measure_speedup(state, original, gm, example, tmp, status, args.threads or 1,
                                   timing=not args.no_timing)
        if eval_data:
            status("evaluating the compiled model on eval_data()")
        acc_after = accuracy(gm, eval_data()) if eval_data else None
        training = ctx.results.get("train")
        report = build_report(
            state, pipeline=str(pipeline), original=original, compiled=gm,
            onnx={**check.to_json(), "path": str(Path(os.path.abspath(out)) / "model.onnx")},
            training=training.to_json() if training else None,
            accuracy={"before": acc_before, "after": acc_after} if eval_data else None, latency=latency,
            model_file=str(model_path), seconds=time.perf_counter() - start, stage_seconds=ctx.results.get("seconds"))
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(markdown(report))
        writer.commit()
    _say("")
    _say(text_table(layer_rows(report)))
    _say("")
    for line in summary_lines(report):
        _say(line)
    _say(f"wrote {', '.join(OUTPUTS)} to {out}")
    return 0


def _check_paths(args, pipeline: Pipeline, model_path: Path, out: Path) -> None:
    """Every path the run will write, checked before the model is built: each can be written, none is
    the input or another output, and each option has a stage that reads it."""
    names = {s.name for s in pipeline.stages}
    if args.checkpoint and "train" not in names:
        raise SpecError(f"--checkpoint: the pipeline '{pipeline}' has no train stage to checkpoint; drop it or add "
                        "--epochs N to a preset")
    if args.latency_cache and "plan-latency" not in names:
        raise SpecError(f"--latency-cache: the pipeline '{pipeline}' has no plan-latency stage that measures; drop "
                        "it or add --target-speedup S or --max-drop D")
    folders = {f"train{{checkpoint={s.checkpoint}}}": s.checkpoint for s in pipeline.stages
               if getattr(s, "checkpoint", "")}
    if args.checkpoint:
        folders["--checkpoint"] = args.checkpoint
    for flag, folder in folders.items():
        if Path(folder).name == checkpoint.FILE and Path(folder).is_file():
            raise SpecError(f"{flag} {folder} names the checkpoint file itself; give its folder {Path(folder).parent}")
        check_writable(folder, flag, folder=True)
    caches = {"--latency-cache": args.latency_cache} if args.latency_cache else {}
    caches.update({f"plan-latency{{cache={s.cache}}}": s.cache for s in pipeline.stages
                   if s.name == "plan-latency" and s.cache and s.cache != args.latency_cache})
    if "plan-latency" in names and not caches:
        caches["the latency cache"] = None  # the default one
    for flag, cache in caches.items():
        try:
            LatencyCache.check(cache)
        except SpecError as e:
            raise SpecError(str(e).replace("latency cache", flag, 1) if cache is None else
                            str(e).replace("--latency-cache", flag)) from None
    paths = {"the input": model_path, "-o": out, **folders, **caches}
    check_distinct(paths)
    outdir = Path(os.path.abspath(out)).resolve()
    for flag, path in {**folders, **caches}.items():
        if path is not None and outdir in Path(os.path.abspath(path)).resolve().parents:
            raise SpecError(f"{flag} {path} lies inside the output folder {out}; put it elsewhere")


def _measure_speedup(state, original, compiled, example, folder: Path, status, threads: int,
                     timing: bool = True) -> dict | None:
    """The original and the compiled model timed paired: in plan-latency's runtime and settings after
    it, else (unless `timing` is off) in onnxruntime on the CPU at batch 1. A compiled model that
    measures slower gets a warning: after plan-latency it names the layers with the least predicted
    gain, else it points to --target-speedup. Without `timing`, plan-latency's prediction alone."""
    if not timing or (state.latency is None and not any(r.lowering for r in state.layers.values())):
        return state.latency
    if state.latency is not None:
        runtime = Runtime(**{k: state.latency["runtime"][k] for k in ("runtime", "device", "threads", "batch")})
        latency = state.latency
    else:
        runtime = Runtime("ort", "cpu", threads, 1)
        latency = {"runtime": runtime.to_json()}
    where = f"{runtime.runtime} {runtime.device}, {runtime.threads} thread(s), batch {runtime.batch}"
    status(f"timing the original and the compiled model ({where})")
    try:
        timers = [model_timer(original, example, runtime, folder / "original.onnx"),
                  model_timer(compiled, example, runtime, folder / "model.onnx")]
        once = sum(run() for run in timers)  # seconds for one run of each: at most about 3 s of timing
        result = compare_models(timers, reps=max(10, min(30, int(3 / max(once, 1e-9)))), threads=runtime.threads)
    except Exception as e:  # the compile (perhaps hours of training) is written all the same
        first = first_line(e)
        log.warning("warning: timing the models in %s failed (%s: %s); the compiled model is written without a "
                    "measured speedup (twistc bench times the files)", where, type(e).__name__, first)
        return state.latency
    before, after = result["median_ms"]
    measured = {"before_ms": before, "after_ms": after, "speedup": result["speedup"],
                "speedup_ci95": result["speedup_ci95"], "reps": result["reps"], "samples_ms": result["samples_ms"],
                "trustworthy": result["trustworthy"], "problems": result["problems"], "sampling": result["sampling"]}
    if not result["trustworthy"]:
        log.warning("warning: the machine is too busy for a trustworthy timing (%s), even measured three times as "
                    "long; the measured %.2fx may be far off: time model.onnx against original.onnx with `twistc "
                    "bench` on a quiet machine", "; ".join(result["problems"]), measured["speedup"])
        return {**latency, "measured": measured}
    target = (state.latency or {}).get("target", {}).get("speedup")
    if target and measured["speedup_ci95"][1] < 0.95 * target:
        blamed = sorted(((r.latency_before or 0) - (r.latency_after or 0), r.name) for r in state.layers.values()
                        if r.lowering and r.latency_before)
        log.warning("warning: the target speedup %.2fx was missed: planned %.2fx, measured %.2fx (95%% CI %.2f-%.2f) "
                    "in %s; the layers the plan counted on most: %s", target, state.latency["predicted_speedup"],
                    measured["speedup"], *measured["speedup_ci95"], where,
                    ", ".join(f"{n} ({1e3 * gain:.0f} us)" for gain, n in blamed[::-1][:3]))
    if measured["speedup"] < 1:
        gains = sorted((r.latency_after - r.latency_before, r.name) for r in state.layers.values()
                       if r.lowering and r.latency_before)
        hint = (f"the layers with the least predicted gain: {', '.join(n for _, n in gains[-3:][::-1])}"
                if state.latency is not None else "fewer weights are not fewer milliseconds here; --target-speedup "
                "S chooses each layer's form and ranks by measured latency")
        log.warning("warning: the compiled model measured slower than the original (%.2fx in %s): %s",
                    measured["speedup"], where, hint)
    return {**latency, "measured": measured}


def passes_command(args) -> int:
    if args.name in PRESETS:
        expansion, summary = PRESETS[args.name]
        _say(f"{args.name}: {summary}\n  = {expansion}\n`twistc passes NAME` lists the options of each item; "
             "--ratio, --epochs, --lr, --period and --option fill the ones the preset does not write")
        return 0
    if args.name:
        cls = stage_class(args.name)
        _say(f"{cls.name}: {cls.summary}\n")
        hints = typing.get_type_hints(cls)
        rows = [(f.name, _type_name(hints[f.name]), "-" if f.default is None else format_value(f.default),
                 cls.option_help.get(f.name, "")) for f in dataclasses.fields(cls)]
        _say(text_table(rows, ("option", "type", "default", "meaning"), max_note=100) if rows else "no options")
        return 0
    rows = describe()
    width = max(len(r[0]) for r in rows)
    for name, summary, expansion in rows:
        _say(f"{name.ljust(width)}  {summary}" + (f"\n{' ' * width}  = {expansion}" if expansion else ""))
    return 0


def eval_command(args) -> int:
    if args.threads < 1:
        raise SpecError(f"--threads must be >= 1, got {args.threads}")
    mf = load_model_file(Path(args.model).resolve(), _options(args.options))
    if not mf.has("eval_data"):
        raise SpecError(f"{args.model} defines no eval_data(); twistc eval needs (input, target) batches from it")
    sess = session(args.onnx, "cpu", args.threads)
    name = sess.get_inputs()[0].name
    correct = seen = 0
    for x, y in mf.call("eval_data"):
        (logits,) = sess.run(None, {name: x.numpy()})[:1]
        correct += int((torch.from_numpy(logits).argmax(1) == y).sum())
        seen += len(y)
    if not seen:
        raise SpecError(f"eval_data() in {args.model} yielded no batches")
    _say(f"{args.onnx}: top-1 accuracy {correct / seen:.2%} ({correct:,} of {seen:,}) on eval_data() of {args.model}")
    return 0


def _type_name(tp) -> str:
    text = getattr(tp, "__name__", None) or str(tp)
    return text.replace("typing.", "").replace("NoneType", "None").replace("tuple[int, ...]", "HxW")


def bench_command(args) -> int:
    for flag, value, least in (("--batch", args.batch, 1), ("--threads", args.threads, 1), ("--reps", args.reps, 1),
                               ("--warmup", args.warmup, 0)):
        if value < least:
            raise SpecError(f"{flag} must be >= {least}, got {value}")
    result = bench(args.models, args.batch, args.threads, args.provider, args.warmup, args.reps, spin=args.spin,
                   runtime=args.runtime)
    ci = (lambda m: f"[{m['speedup_ci95'][0]:.2f}, {m['speedup_ci95'][1]:.2f}]") if result["trustworthy"] else \
        (lambda m: "(unsteady)")
    rows = [(m["path"], f"{m['median_ms']:.3f}", f"{m['p10_ms']:.3f}-{m['p90_ms']:.3f}",
             f"{m['speedup_vs_first']:.2f}x {ci(m)}") for m in result["models"]]
    where = {"ort": "onnxruntime", "torch": "PyTorch eager", "torch-compile": "PyTorch, torch.compile"}[args.runtime]
    threads = f"{args.threads} thread{'s' * (args.threads > 1)}"
    _say(f"{where} {result['provider']} ({result['machine']}), batch {args.batch}, {threads}, {args.reps} paired reps")
    header = ("model", "median ms", "p10-p90 ms", "speedup over the first [95% CI]", "")
    _say(text_table([r + ("",) for r in rows], header))
    if not result["trustworthy"]:
        log.warning("warning: the machine is too busy for trustworthy timings (%s), even measured three times as "
                    "long; the speedups may be far off", "; ".join(result["problems"]))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()  # twistc's warnings, to this call's stderr
    handler.setFormatter(logging.Formatter("twistc: %(message)s"))
    log = logging.getLogger("twistc")
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # SIGTERM unwinds like Ctrl-C, so temporary files are removed; a file-size limit makes
        # a write fail with EFBIG instead of killing the process
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_stopped),
                    signal.SIGXFSZ: signal.signal(signal.SIGXFSZ, signal.SIG_IGN)}
    command = {"compile": compile_command, "passes": passes_command, "bench": bench_command,
               "eval": eval_command}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt as e:
        return _stopped(getattr(e, "signum", signal.SIGINT), getattr(e, "message", ""))
    except TwistcError as e:
        if _signals_received:  # a library turned the stop into an error of its own
            return _stopped(_signals_received[-1])
        print(f"twistc: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if _signals_received:
            return _stopped(_signals_received[-1])
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS and not args.debug:  # a full disk, a size limit
            print(f"twistc: error: cannot write {e.filename or 'a file'}: {e.strerror}; nothing was written in "
                  "its place", file=sys.stderr)
            return 2
        failure = distributed.collective_failure(e)
        if failure and not args.debug:
            print(f"twistc: error: {failure}", file=sys.stderr)
            return 2
        if args.debug:
            traceback.print_exc()
        print(f"twistc: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        log.removeHandler(handler)
        logging.getLogger("twistc.train").setLevel(logging.NOTSET)
        if main_thread:
            for signum, handler_before in previous.items():
                signal.signal(signum, handler_before)
        _signals_received.clear()


_signals_received: list[int] = []


def _stopped(signum: int, message: str = "") -> int:
    print(f"twistc: stopped by {signal.Signals(signum).name}; {message or 'nothing was written'}", file=sys.stderr)
    return 128 + signum


def _raise_stopped(signum, frame):
    _signals_received.append(signum)
    raise Stopped(signum)


if __name__ == "__main__":
    sys.exit(main())
