"""The `twistc` command line: the parser, and error handling around the commands (twistc.commands).

Errors the user can fix are printed as one line (`twistc: error: ...`) with exit status 2; outputs
are written into a temporary directory beside OUTDIR and moved into place only when complete. This
module imports neither torch nor the rest of twistc until a command runs, so `--help` and argument
errors answer at once.
"""
from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
import traceback

from twistc.defaults import DEFAULT_DISTILL, DEFAULT_RATIO
from twistc.errors import SpecError, Stopped, TwistcError, spell_options
from twistc.files import WRITE_ERRNOS

# the flag that sets each option an error message names (twistc.errors.spell_options)
FLAGS = {"resume": "--resume", "checkpoint": "--checkpoint DIR", "lr": "--lr", "atol": "--atol", "rtol": "--rtol",
         "cache": "--latency-cache PATH", "provider": "--provider cpu"}


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
                        "batches of train_data(), else eval_data(), that a calibrate stage put in front collects); "
                        "default: activation for a compile that does not train when MODEL.py has either, else weight")
    c.add_argument("--calib-batches", type=int, metavar="N", help="batches calibrate collects on (16)")
    c.add_argument("--handoff", type=float, metavar="F",
                   help="DeepTwist presets: spend the fraction F of the epochs training in the original shape, then "
                        "lower and train the factors for the rest, on one learning-rate schedule")
    c.add_argument("--distill", type=float, metavar="W",
                   help="train stages: weight in [0, 1] of knowledge distillation from the original model "
                        f"(train{{distill=W}}; default {DEFAULT_DISTILL:g}; 0: labels only, about a fifth less "
                        "time per epoch)")
    c.add_argument("--plan", help="plan JSON (or a report.json) whose per-layer entries override pass options")
    c.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="option passed to MODEL.py functions that take KEY (repeatable)")
    c.add_argument("--option", dest="stage_options", action="append", default=[], metavar="KEY=VALUE",
                   help="option for every stage of the pipeline that has KEY and whose spec does not write it, "
                        "e.g. --option accumulate=4 --option eval_every=1 for the train stage of a preset "
                        "(repeatable)")
    c.add_argument("--atol", type=_tolerance, help="ONNX check absolute tolerance (1e-4; 1e-2 for a float16 model)")
    c.add_argument("--rtol", type=_tolerance, help="ONNX check relative tolerance (1e-4; 1e-2 for a float16 model)")
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


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def options(pairs: list[str], flag: str = "--set") -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise SpecError(f"{flag} {pair!r}: write KEY=VALUE")
        out[key] = value
    return out


def entry(argv: list[str] | None = None) -> int:
    """The `twistc` command and `python -m twistc`: main(), after which the process ends. Freezing the heap
    first spares the interpreter's final garbage collections, which would walk every object torch and the
    compiled model left behind (0.4-0.9 s of each exit); the memory is freed at exit all the same."""
    code = main(argv)
    gc.freeze()
    return code


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
    try:
        from twistc import commands  # torch and the rest of twistc: only once a command runs

        return getattr(commands, f"{args.command}_command")(args)
    except KeyboardInterrupt as e:
        return _stopped(getattr(e, "signum", signal.SIGINT), spell_options(getattr(e, "marked", ""), FLAGS))
    except TwistcError as e:
        if _signals_received:  # a library turned the stop into an error of its own
            return _stopped(_signals_received[-1])
        print(f"twistc: error: {spell_options(e.marked, FLAGS)}", file=sys.stderr)
        return 2
    except Exception as e:
        if _signals_received:
            return _stopped(_signals_received[-1])
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS and not args.debug:  # a full disk, a size limit
            print(f"twistc: error: cannot write {e.filename or 'a file'}: {e.strerror}; nothing was written in "
                  "its place", file=sys.stderr)
            return 2
        from twistc.distributed import collective_failure

        failure = collective_failure(e)
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

