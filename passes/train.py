"""train: the pipeline stage that trains the graph module on the user's data (twistc.train's loop), then
runs DeepTwist's final projection. Train stages of one pipeline linked by `handoff` are one training of
several phases: one learning-rate schedule, the optimizer state carried across.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.fx as fx

from twistc import checkpoint, distributed
from twistc.errors import SpecError
from twistc.evaluation import accuracy
from twistc.pipeline import PassResult, RunContext, Stage, register
from twistc.resume import Checkpointing
from twistc.train import TrainConfig, TrainResult, final_projection, projections, recalibrate_batchnorm, train


@register
@dataclass(frozen=True)
class Train(TrainConfig, Stage):
    name = "train"
    run_defaults = ("epochs", "lr", "seed", "distill", "device")
    summary = ("stage: SGD (Nesterov momentum) or AdamW with a cosine, linear or constant lr on train_data(), then "
               "DeepTwist's final projection")
    option_help = {**TrainConfig.option_help,
                   "checkpoint": "folder for checkpoints (else the run's)",
                   "checkpoint_every": "also save a checkpoint every that many optimizer steps (else the run's "
                   "setting; 0: at epoch ends only)",
                   "finalize": "end with DeepTwist's final projection (false: the lowering makes it, after a "
                   "calibrate that refreshes the projections' statistics, say)",
                   "handoff": "none (a training of its own), continue (go on with the previous train stage's "
                   "learning-rate schedule and optimizer state, e.g. after lowering) or rewind (its optimizer state, "
                   "the schedule from its peak again)"}
    HANDOFFS = ("none", "continue", "rewind")

    checkpoint: str = ""
    checkpoint_every: int = 0
    finalize: bool = True
    handoff: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if self.handoff not in self.HANDOFFS:
            raise SpecError(f"train: handoff must be {', '.join(self.HANDOFFS)}, got {self.handoff!r}")
        if self.checkpoint_every < 0:
            raise SpecError(f"train: checkpoint_every must be a finite number >= 0, got {self.checkpoint_every}")

    def needs(self) -> tuple[str, ...]:
        return ("train_data",) if self.epochs > 0 else ()

    @property
    def needs_teacher(self) -> bool:
        return self.distill > 0 and self.epochs > 0

    def check_order(self, before, after) -> None:
        if self.handoff != "none" and not any(s.name == "train" for s in before):
            raise SpecError(f"train{{handoff={self.handoff}}} continues an earlier train stage; the pipeline has "
                            "none before it")

    def span(self, ctx: RunContext) -> tuple[int, int]:
        """(epochs before this stage, all epochs) of the learning-rate schedule this stage is part of: a
        train stage and the later ones that continue it (handoff=continue) share one schedule."""
        trains = [s for s in ctx.stages if s.name == "train"]
        i = next((j for j, s in enumerate(trains) if s is self), None)
        if i is None:  # run on its own, outside a pipeline
            return 0, self.epochs
        start = i
        while start > 0 and trains[start].handoff == "continue":
            start -= 1
        end = i + 1
        while end < len(trains) and trains[end].handoff == "continue":
            end += 1
        return sum(s.epochs for s in trains[start:i]), sum(s.epochs for s in trains[start:end])

    def run(self, gm: fx.GraphModule, ctx: RunContext) -> PassResult:
        if ctx.train_data is None:
            if self.epochs > 0:
                raise SpecError("the train stage needs train_data(); define it in MODEL.py")
        folder = self.checkpoint or ctx.checkpoint
        every = self.checkpoint_every or ctx.checkpoint_every
        if every and not folder:
            raise SpecError("train: checkpoint_every needs a folder to save into: train{checkpoint=DIR} or "
                            "<option:checkpoint>")
        previous = ctx.results.get("train")
        if self.handoff != "none" and previous is None:
            raise SpecError(f"train{{handoff={self.handoff}}} continues an earlier train stage; none ran before it")
        identity = checkpoint.identity(ctx.pipeline, gm, distributed.world()[1])
        number = next((sum(t.name == "train" for t in ctx.stages[:i]) for i, s in enumerate(ctx.stages)
                       if s is self), 0)  # train stages before this one
        name = checkpoint.FILE if number == 0 else f"checkpoint-train{number + 1}.pt"
        checkpointing = Checkpointing(Path(folder), identity, ctx.resume, every, name) if folder else None
        if self.needs_teacher and ctx.teacher is None:
            raise SpecError("train: distill needs the original model as teacher; run it in a Pipeline, which keeps "
                            "one, or set RunContext.teacher")
        result = train(gm, ctx.train_data, config=self, progress=ctx.progress, finalize=False,
                       checkpointing=checkpointing, shard=not ctx.train_data_sharded, eval_data=ctx.eval_data,
                       teacher=ctx.teacher, span=self.span(ctx) if self.handoff != "rewind" else None,
                       carried=previous.carried if self.handoff != "none" else None) if self.epochs else TrainResult(0)
        result.phases = [{"stage": self.spec(), "epochs": self.epochs, "steps": result.steps,
                          "seconds": result.seconds, "teacher_seconds": result.teacher_seconds,
                          "handoff": self.handoff}]
        if ctx.eval_data is not None and distributed.is_main() and any(not p.finalized for p in projections(gm)):
            result.accuracy_before_final_projection = accuracy(gm, ctx.eval_data())
        result.final_projections = final_projection(gm) if self.finalize else 0
        if self.recalibrate_bn and result.final_projections:
            recalibrate_batchnorm(gm, ctx.train_data, self.recalibrate_bn)
        ctx.results["train"] = result if previous is None else _merge(previous, result)
        return PassResult(gm, self.epochs > 0 or result.final_projections > 0)


def _merge(a: TrainResult, b: TrainResult) -> TrainResult:
    return TrainResult(a.epochs + b.epochs, a.steps + b.steps, a.distortions + b.distortions,
                       a.final_projections + b.final_projections, b.final_loss, a.seconds + b.seconds,
                       b.lr, a.losses + b.losses, a.distortion_changes + b.distortion_changes,
                       b.accuracy_before_final_projection or a.accuracy_before_final_projection,
                       b.adaptive_periods or a.adaptive_periods,
                       a.evaluations + [{**e, "epoch": a.epochs + e["epoch"]} for e in b.evaluations],
                       a.epochs + b.kept_epoch if b.kept_epoch else a.kept_epoch, a.sessions + b.sessions,
                       a.teacher_seconds + b.teacher_seconds, a.phases + b.phases, b.carried)
