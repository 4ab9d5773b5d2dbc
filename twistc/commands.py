"""The commands behind `twistc compile`, `passes`, `eval` and `bench` (the parser is twistc.cli)."""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import json
import logging
import os
import sys
import time
import typing
from pathlib import Path

import torch

from twistc import checkpoint, distributed
from twistc.bench import bench, session
from twistc.cli import options
from twistc.decomp import FORMS
from twistc.defaults import DEFAULT_DISTILL
from twistc.errors import SpecError, first_line, name_list
from twistc.export import export_onnx, save_program
from twistc.files import check_distinct, check_writable
from twistc.latency import Runtime, compare_models, model_timer
from twistc.latency_cache import LatencyCache
from twistc.modelfile import load_model_file
from twistc.outdir import OutputDir, check_output
from twistc.pipeline import (Item, Pipeline, RunContext, describe, format_value, parse_item, presets,
                             split_items, stage_class)
from twistc.passes.lower import Lowering
from twistc.plan import Plan
from twistc.report import build_report, layer_rows, markdown, summary_lines, text_table
from twistc.state import state_of
from twistc.trace import trace
from twistc.evaluation import accuracy

log = logging.getLogger(__name__)

OUTPUTS = ("original.onnx", "model.onnx", "model.pt2", "report.json", "report.md")


def handoff_epochs(fraction: float, epochs: int | None) -> tuple[int, int]:
    """A budget of `epochs` (None: the train stage's default) split at a hand-off: (epochs in the original
    shape under DeepTwist, epochs of the factors after lowering), each at least one."""
    total = epochs if epochs is not None else next(f.default for f in dataclasses.fields(stage_class("train"))
                                                   if f.name == "epochs")
    first = round(fraction * total)
    if not 0 < fraction < 1 or first < 1 or first >= total:
        raise SpecError(f"--handoff {fraction:g} of {total} epochs leaves {first} epochs for DeepTwist and "
                        f"{total - first} for the factors; each needs at least 1 (a fraction in (0, 1), more --epochs)")
    return first, total - first


def preset_items(spec: str, epochs: int | None = None, latency_target: dict | None = None,
                 handoff: float | None = None) -> list[Item]:
    """The items of a spec, its presets as the CLI's flags extend them. `latency_target` ({"speedup": S} or
    {"max_drop": D}) puts plan-latency with it in front of a preset that `plans`; `handoff` (a fraction of
    the epochs): a preset that `hands_off` trains that much in the original shape, lowers, and trains the
    factors for the rest on one schedule."""
    known, items, used = presets(), [], []
    train = stage_class("train")
    for text in split_items(spec):
        preset = known.get(text)
        if preset is None:
            items.append(parse_item(text))
            continue
        used.append(preset)
        own = list(preset.items)
        fold = next(i for i, item in enumerate(own) if item.name == "fold")
        if preset.fine_tunes and epochs:
            own.insert(fold, Item(train))  # fold freezes BatchNorm: after training
        if handoff is not None and preset.hands_off:
            first, rest = handoff_epochs(handoff, epochs)
            own[next(i for i, item in enumerate(own) if item.name == "train")] = Item.of(train, epochs=first)
            own.insert(fold, Item.of(train, epochs=rest, handoff="continue"))
        if latency_target and preset.plans:
            own.insert(0, Item.of(stage_class("plan-latency"), **latency_target))
        items += own
    if handoff is not None and not any(p.hands_off for p in used):
        raise SpecError(f"--handoff applies to the presets {', '.join(n for n, p in known.items() if p.hands_off)}; "
                        "in a pipeline of your own, write train{epochs=E1},LOWERING,...,train{epochs=E2,handoff=continue}")
    if latency_target and not any(p.plans for p in used):
        [key] = latency_target
        flag = {"speedup": "--target-speedup", "max_drop": "--max-drop"}[key]
        raise SpecError(f"{flag} applies to the presets {' and '.join(n for n, p in known.items() if p.plans)}; "
                        f"in a pipeline of your own, write plan-latency{{{key}=...}} in front")
    return items


def fits_data(item: Item) -> bool:
    """Whether the item lowers layers whose decomposition can fit its factors to the data."""
    return issubclass(item.cls, Lowering) and any(FORMS[f][0].data_aware for f in item.stage().allowed())


def build_pipeline(spec: str, args, has_data: bool = False) -> Pipeline:
    """The pipeline from --pass; the other flags fill the options each stage takes from them (its
    `run_defaults`) where the spec does not write them, and --option KEY=VALUE those of every stage that
    has KEY. Passes after one that writes the plan (deeptwist, plan-latency) take ranks, order and tiles
    from it, so those flags skip them. Without --fit, a pipeline that does not train fits its factors to
    the data where MODEL.py has some (`has_data`): its factors are all the accuracy it keeps
    (results/post_training_fit)."""
    extra = options(args.stage_options, "--option")
    target = ({"speedup": args.target_speedup} if args.target_speedup is not None else
              {"max_drop": args.max_drop} if args.max_drop is not None else None)
    items = preset_items(spec, args.epochs, target, args.handoff)
    auto = (args.fit is None and has_data and any(map(fits_data, items))
            and not any(item.name == "train" or "fit" in item.given for item in items))
    if (args.fit == "activation" or auto) and not any(item.name == "calibrate" for item in items):
        items.insert(0, Item(stage_class("calibrate")))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    stages, planned = [], False
    for item in items:
        values = {"epochs": args.epochs, "lr": args.lr, "seed": args.seed, "period": args.period,
                  "threads": args.threads, "cache": args.latency_cache,
                  "distill": DEFAULT_DISTILL if args.distill is None else args.distill,
                  "fit": args.fit or ("activation" if auto and fits_data(item) else None),
                  "batches": args.calib_batches, "device": device if device != "cpu" else None}
        if not planned:
            values.update(order=args.order, tile=args.tile, grid=args.grid, ratio=args.ratio)
        stage = item.with_defaults({**values, **extra}, also=extra).stage()
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
    joined = distributed.init_from_env()  # under torchrun: join the other ranks
    code = _compile(args)
    if joined:
        distributed.leave()
    return code


def _compile(args) -> int:
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
    mf = load_model_file(model_path, options(args.options))
    if args.fit is None and (mf.has("train_data") or mf.has("eval_data")):
        pipeline = build_pipeline(args.pipeline, args, has_data=True)
        pipeline.check_whole()
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
    original = mf.model()
    try:
        original.eval()
    except NotImplementedError:  # torch.export's module of a loaded program (a model.pt2)
        raise SpecError(f"model() in {model_path.name} returns {type(original).__name__}, a torch.export program's "
                        "module (a loaded .pt2?), which twistc cannot trace again; return the nn.Module itself") \
            from None
    example = mf.example_inputs()
    eval_data = mf.data("eval_data")  # the ranks share evaluations during training; rank 0 alone does the rest
    start = time.perf_counter()
    phases: dict[str, float] = {}  # where the compile's time went, for the report
    if eval_data:
        status("evaluating the original model on eval_data()")
    with _timed(phases, "evaluation"):
        acc_before = accuracy(original, eval_data()) if eval_data and main_rank else None
    status("tracing")
    with _timed(phases, "trace"):
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
        with _timed(phases, "original.onnx"):
            export_onnx(original, example, tmp / "original.onnx", args.atol, args.rtol)
        with _timed(phases, "passes"):
            gm = pipeline.run(gm, ctx)
        _check_some_layer_compressed(pipeline, state)
        gm.eval()
        status("exporting model.onnx and checking it in onnxruntime")
        with _timed(phases, "model.onnx"):
            check = export_onnx(gm, example, tmp / "model.onnx", args.atol, args.rtol)
        with _timed(phases, "model.pt2"):
            save_program(gm, example, tmp / "model.pt2")
        with _timed(phases, "latency"):
            latency = _measure_speedup(state, original, gm, example, tmp, status, args.threads or 1,
                                       timing=not args.no_timing)
        if eval_data:
            status("evaluating the compiled model on eval_data()")
        with _timed(phases, "evaluation"):
            acc_after = accuracy(gm, eval_data()) if eval_data else None
        training = ctx.results.get("train")
        report = build_report(
            state, pipeline=str(pipeline), original=original, compiled=gm,
            onnx={**check.to_json(), "path": str(Path(os.path.abspath(out)) / "model.onnx")},
            training=training.to_json() if training else None,
            accuracy={"before": acc_before, "after": acc_after} if eval_data else None, latency=latency,
            model_file=str(model_path), seconds=time.perf_counter() - start, phase_seconds=phases,
            stage_seconds=ctx.results.get("seconds"))
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


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str):
    """Add the seconds the block takes to phases[name]."""
    begin = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - begin


def _check_some_layer_compressed(pipeline: Pipeline, state) -> None:
    """A pipeline that lowers but lowered nothing is an error that says why, layer by layer."""
    if not any(s.name.startswith("lower-") for s in pipeline.stages) or any(r.lowering for r in
                                                                             state.layers.values()):
        return
    reasons = collections.Counter(r.skip_reason or "no reason recorded" for r in state.layers.values())
    raise SpecError("no layer could be compressed, so nothing would be written: " + "; ".join(
        f"{n} layer{'s' * (n > 1)}: {why}" for why, n in reasons.most_common(3)))


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
        LatencyCache.check(cache, flag)
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
        runtime = Runtime(**{k: v for k, v in state.latency["runtime"].items() if k != "machine"})
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
    if args.name in presets():
        preset = presets()[args.name]
        _say(f"{args.name}: {preset.summary}\n  = {preset}\n`twistc passes NAME` lists the options of each item; "
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
    mf = load_model_file(Path(args.model).resolve(), options(args.options))
    if not mf.has("eval_data"):
        raise SpecError(f"{args.model} defines no eval_data(); twistc eval needs (input, target) batches from it")
    sess = session(args.onnx, "cpu", args.threads)
    name = sess.get_inputs()[0].name
    correct = seen = 0
    expected = sess.get_inputs()[0].shape
    for x, y in mf.call("eval_data"):
        try:
            (logits,) = sess.run(None, {name: x.numpy()})[:1]
        except Exception as e:
            raise SpecError(f"onnxruntime cannot run {args.onnx} on a batch of eval_data() of shape "
                            f"{tuple(x.shape)} (the model takes {expected}): {first_line(e)[:200]}") from None
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


