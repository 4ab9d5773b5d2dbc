"""Shared pieces of the experiment scripts: resumable run store, paired bootstrap, run metadata.

Each run is one JSON file under <out>/runs/; a rerun skips runs whose file exists, so a grid can be
spread over several sessions and each finished run committed on its own.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twistc import Pipeline, RunContext, state_of, trace
from twistc.data import cifar10_batches
from twistc.errors import Stopped
from twistc.files import atomic_write
from twistc.models import load_resnet32
from twistc.plan import Plan
from twistc.counting import count_parameters  # noqa: F401 (for the tools)
from twistc.machine import cpu_model, versions  # noqa: F401
from twistc.report import markdown_table  # noqa: F401 (the tools' table writer)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# the distillation of the experiments' distilled arms: weight and temperature, as train options
DISTILL, TEMPERATURE = 0.5, 4.0
DISTILLATION = f",distill={DISTILL:g},temperature={TEMPERATURE:g}"
CHECKPOINTS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "twistc" / "experiments"
CIFAR10_TRAIN_IMAGES = 50_000  # the training split every experiment here trains on


def resumable(main) -> int:
    """Run an experiment's `main`; a stop (Ctrl-C, SIGTERM) ends it with one line, since the same command
    continues from the checkpoints and finished runs. Outside training (which stops after its step and
    checkpoints), SIGTERM stops at once, as Ctrl-C does."""
    def stop(signum, frame):
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        return main()
    except KeyboardInterrupt as e:
        where = getattr(e, "message", "").split(";")[0]  # "checkpoint saved in ...", without the CLI's --resume
        print(f"stopped: {where or 'interrupted'}; run the same command again to continue", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)


class RunStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "runs").mkdir(parents=True, exist_ok=True)

    def path(self, run_id: str) -> Path:
        return self.root / "runs" / f"{run_id}.json"

    def done(self, run_id: str) -> bool:
        return self.path(run_id).is_file()

    def save(self, run_id: str, result: dict, checkpoints: str | None = None) -> None:
        """Atomic write: a run file exists only when the run finished; then its checkpoint goes."""
        text = json.dumps(result, indent=1) + "\n"
        atomic_write(self.path(run_id), lambda f: f.write(text.encode()), "run record", "the run can be rerun")
        if checkpoints:
            shutil.rmtree(Path(checkpoints) / run_id, ignore_errors=True)

    def load_all(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.root / "runs").glob("*.json"))]


def pack_bools(correct: np.ndarray) -> str:
    return base64.b64encode(np.packbits(correct.astype(bool)).tobytes()).decode()


def unpack_bools(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b (per-sample correctness) and its 95% percentile interval, resampling test images."""
    rng = np.random.default_rng(seed)
    diff = a.astype(np.float64) - b.astype(np.float64)
    idx = rng.integers(0, len(diff), size=(reps, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_difference(pairs: list[tuple[dict, dict]]) -> str:
    """Test accuracy of a minus b over paired runs (seeds pooled), with its paired bootstrap 95% CI."""
    if not pairs:
        return "-"
    a, b = (np.concatenate([unpack_bools(p[k]["test_correct"], p[k]["test_n"]) for p in pairs]) for k in (0, 1))
    m, lo, hi = paired_bootstrap(a, b)
    return f"{100 * m:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def late_change(run: dict) -> float | None:
    """What a DeepTwist distortion removed from a kernel (||W - P(W)|| / ||W||, mean over the layers it
    projected), averaged over the run's second half; None when the run recorded none."""
    changes = run.get("distortion_changes")
    return float(np.mean(changes[len(changes) // 2:])) if changes else None


@torch.no_grad()
def correctness(module: torch.nn.Module, batches) -> np.ndarray:
    module.eval()
    out = [(module(x).argmax(1) == y).numpy() for x, y in batches]
    return np.concatenate(out)


def metadata() -> dict:
    return {"command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
            "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                        **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {})},
            "versions": versions()}


def machines(run: dict) -> str:
    """Where the run trained: each machine in turn when it was resumed on others, else where it ran."""
    names = [s["hardware"] for s in run.get("train_sessions", [])]
    names = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    return " -> ".join(names) if len(names) > 1 else run["machine"].get("gpu", run["machine"]["cpu"])


def figure(size=(6, 4.2), ncols: int = 1, sharey: bool = True):
    """A matplotlib figure and its axes (an array of `ncols` panels, sharing y unless told not to), drawn
    off-screen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=size, sharey=sharey)


def save_figure(fig, ax, path: Path, dpi: int = 120) -> None:
    """Legend and grid on each panel, tight layout, then write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    for panel in np.atleast_1d(ax):
        panel.legend(fontsize=7)
        panel.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


@dataclass
class Budget:
    """Data, checkpoint and the fine-tuning budget shared by every run of an experiment."""

    data: str
    checkpoint: str
    epochs: int = 3
    lr: float = 0.01
    batch: int = 128
    progress: bool = False
    smoke: bool = False  # tiny subsets: a few steps, 200 test images
    checkpoints: str | None = None  # folder of per-run training checkpoints (resumed after a stop)
    eval_every: int = 0  # epochs between test-set evaluations during training (0: none)
    channels_last: bool = False  # train in channels-last memory order (faster here; equal to float tolerance)
    device: str = "cpu"  # where the train stage runs

    def __post_init__(self):
        self.train_subset = np.arange(0, 45000, 700)[:64] if self.smoke else None
        self.test_subset = np.arange(0, 10000, 50) if self.smoke else None
        if self.smoke:
            self.epochs, self.batch = 1, 32
        self._baseline = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch of the training set (the last batch may be partial)."""
        images = len(self.train_subset) if self.train_subset is not None else CIFAR10_TRAIN_IMAGES
        return -(-images // self.batch)

    def test_batches(self):
        return cifar10_batches(self.data, "test", batch_size=500, subset=self.test_subset)

    def train_spec(self, seed: int, epochs: int | None = None, extra: str = "") -> str:
        """The train stage of this budget (`epochs` of them: a phase of it), with `extra` options
        (",distill=..." say) appended."""
        own = ((f",eval_every={self.eval_every}" if self.eval_every else "")
               + (",channels_last=true" if self.channels_last else "")
               + (f",device={self.device}" if self.device != "cpu" else ""))
        return f"train{{epochs={self.epochs if epochs is None else epochs},lr={self.lr:g},seed={seed}{own}{extra}}}"

    @property
    def baseline_acc(self) -> float:
        """Test accuracy of the pre-trained checkpoint."""
        if self._baseline is None:
            self._baseline = float(correctness(load_resnet32(self.checkpoint), self.test_batches()).mean())
        return self._baseline


def budget_parser(description: str, out: str, smoke_help: str, lr: float = 0.01,
                  lr_help: str | None = None) -> argparse.ArgumentParser:
    """The options every CIFAR-10 experiment here shares; `budget_of` turns them into a Budget."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=str(SHARED_DATA / "cifar10-jpg.tar.gz"))
    p.add_argument("--checkpoint", default=str(SHARED_DATA / "resnet32_cifar10.pt"))
    p.add_argument("--out", default=str(REPO / "results" / out))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-runs", type=int, help="stop after this many new runs")
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    p.add_argument("--checkpoints", default=str(CHECKPOINTS / out),
                   help="per-run training checkpoints; a stopped run resumes from its own (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="test accuracy during training, every N epochs, as trained and low-rank (it does not change "
                   "the training, so it is not part of the run id)")
    p.add_argument("--channels-last", action="store_true",
                   help="train in channels-last memory order: 1.29x the images/s here (results/train_throughput), "
                   "the same training to float tolerance, so not part of the run id; the run records it")
    p.add_argument("--device", default="cpu", help="where training runs: cpu or cuda (not part of the run id; the run "
                   "records it and the GPU's name)")
    return p


def budget_of(args: argparse.Namespace) -> Budget:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    return Budget(args.data, args.checkpoint, args.epochs, args.lr, args.batch, args.progress, args.smoke,
                  None if args.smoke else args.checkpoints, args.eval_every, args.channels_last, args.device)


def finetune_run(budget: Budget, pipelines: list[str], seed: int, eval_after_first: bool = False,
                 run_id: str | None = None, plan: dict | None = None) -> dict:
    """Run `pipelines` in order on the pre-trained ResNet-32 (one RunContext, so `train` stages see the
    training data) and measure the result on the test set. With `run_id` and `budget.checkpoints`, training
    saves checkpoints under that name and continues from them after a stop. `plan`: a plan to start from."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = load_resnet32(budget.checkpoint)
    params_before = count_parameters(model)
    train_batches = cifar10_batches(budget.data, "train", batch_size=budget.batch, subset=budget.train_subset,
                                    seed=seed)
    test = budget.test_batches()
    gm = trace(model, (torch.randn(1, 3, 32, 32),))
    if plan is not None:
        state_of(gm).plan = Plan.from_json(plan)
    folder = Path(budget.checkpoints) / run_id if budget.checkpoints and run_id else None
    ctx = RunContext(train_data=lambda: train_batches, eval_data=lambda: test, progress=budget.progress,
                     checkpoint=str(folder) if folder else None, resume=True,
                     teacher=load_resnet32(budget.checkpoint).eval())  # distillation's teacher: the pre-trained model
    result = {"pipelines": pipelines, "seed": seed, "epochs": budget.epochs, "lr": budget.lr, "batch": budget.batch,
              "steps_per_epoch": len(train_batches)}
    for i, spec in enumerate(pipelines):
        gm = Pipeline.parse(spec).run(gm, ctx)
        if eval_after_first and i == 0:
            result["test_acc_after_first_pipeline"] = float(correctness(gm, test).mean())
    correct = correctness(gm, test)
    state = state_of(gm)
    layers = [r.to_json() for r in state.layers.values() if r.lowering]
    before, after = sum(r["params_before"] for r in layers), sum(r["params_after"] for r in layers)
    t = ctx.results.get("train")
    checkpoint = load_resnet32(budget.checkpoint)
    with torch.no_grad():  # ||W - P(W)|| / ||W||: the pre-trained kernel vs. the final one
        result["projection_change"] = {
            r["name"]: {"checkpoint": float(state.plan.get(r["name"]).project(
                checkpoint.get_parameter(f"{r['name']}.weight"))[1]), "final": r["final_projection_change"]}
            for r in layers}
    result.update({
        "test_acc": float(correct.mean()), "test_n": int(len(correct)), "test_correct": pack_bools(correct),
        "compressed_layers": len(layers), "layers_ratio": before / after if after else 1.0,
        "model_ratio": params_before / count_parameters(gm),
        "params_before": params_before, "params_after": count_parameters(gm),
        "macs_before": sum(r["macs_before"] for r in layers), "macs_after": sum(r["macs_after"] for r in layers),
        "steps": t.steps if t else 0, "distortions": t.distortions if t else 0,
        "final_projections": t.final_projections if t else 0, "train_loss": t.losses if t else [],
        "distortion_changes": t.distortion_changes if t else [],
        "test_acc_before_final_projection": t.accuracy_before_final_projection if t else None,
        "evaluations": t.evaluations if t else [],
        "plan": state.plan.to_json(), "seconds": time.perf_counter() - start, **metadata(),
    })
    if t:
        result["train_seconds"] = t.seconds  # over all sessions of a resumed run
        result["train_sessions"] = t.sessions
        result["teacher_seconds"] = t.teacher_seconds
        result["phases"] = t.phases
    return result
