"""Training: the loop the `train` stage runs (passes/train.py), its hyperparameters (TrainConfig), and
DeepTwist's final projection.

Any training loop drives DeepTwist (the projections act inside forward); this one is what the
CLI uses: SGD with Nesterov momentum, cosine learning-rate decay, a tqdm bar with loss and the
distortion count. A non-finite loss or weight stops it with a message naming the step and layer.
Stopping and resuming live in twistc/resume.py, accuracy in twistc/evaluation.py.
"""
from __future__ import annotations

import copy
import logging
import math
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from twistc import distributed, resume
from twistc.checkpoint import rng_state, set_rng_state
from twistc.errors import ModelFileError, NonFiniteError, SpecError, Stopped, first_line
from twistc.evaluation import check_targets, class_scores, correct_and_seen, in_mode
from twistc.projection import LowRankProjection
from twistc.machine import cpu_model
from twistc.resume import Checkpointing

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# the learning rate's factor when a fraction `done` of the run is behind
SCHEDULES = {"cosine": lambda done: 0.5 * (1 + math.cos(math.pi * done)), "linear": lambda done: 1 - done,
             "constant": lambda done: 1.0}


@dataclass(frozen=True)
class TrainConfig:
    """The hyperparameters of a training run, shared by train() and the `train` stage (whose options they are).

    `reset_momentum`: after a step that projected weights, clear those weights' momentum, so the velocity
    gathered before the distortion does not push them off the projection. `optimizer`: "sgd" (Nesterov
    momentum) or "adamw" (decoupled weight decay; `momentum` is beta1). `amp="bf16"`: the forward runs under
    bfloat16 autocast; weights, optimizer state and DeepTwist's projections stay float32. `amp="fp16"`:
    float16 autocast, and a gradient scaler (checkpointed) keeps small gradients from flushing to zero; a
    step whose gradients overflow is skipped and the scale halved. `rectify_bn`: after each step that
    projected weights, re-estimate BatchNorm statistics on that many batches of train_data() (BN
    rectification, as LRPET does after pruning, arXiv 2204.05566), leaving the random streams as they were,
    so a resumed run stays exact. `warmup`: the learning rate rises linearly over the first that many steps
    (times the schedule). `accumulate`: each optimizer step averages the gradients of that many batches
    (fewer at an epoch's end); DeepTwist's step counter, the schedule, checkpoints and stops go by optimizer
    steps. `keep_best`: training ends with the weights of the best evaluation (see BestWeights).
    `distill`, `temperature`: knowledge distillation: the loss is (1 - distill) times the labels'
    cross-entropy plus distill * temperature^2 times the KL divergence from the teacher's softened outputs
    (Hinton et al. 2015)."""

    option_help: ClassVar[dict[str, str]] = {
        "epochs": "passes over train_data()", "lr": "peak learning rate",
        "schedule": "the learning rate's decay: cosine (to 0), linear (to 0) or constant",
        "momentum": "SGD's Nesterov momentum, or AdamW's beta1", "weight_decay": "weight decay",
        "seed": "seeds torch, numpy and random",
        "reset_momentum": "clear projected weights' momentum after each distortion",
        "recalibrate_bn": "batches for re-estimating BatchNorm statistics after the final projection",
        "rectify_bn": "batches for re-estimating BatchNorm statistics after every distortion (BN rectification)",
        "optimizer": "sgd (Nesterov momentum) or adamw", "device": "cpu, cuda or cuda:N",
        "amp": "none, bf16 (the forward under bfloat16 autocast), or fp16 (float16 autocast with gradient scaling)",
        "channels_last": "weights and inputs in channels-last order (faster convs on many CPUs)",
        "warmup": "optimizer steps over which the learning rate rises linearly from 0",
        "clip_grad": "largest global L2 norm of the gradients (0: no clipping)",
        "accumulate": "batches whose mean gradient makes one optimizer step (DeepTwist's S_D counts optimizer "
                      "steps)",
        "eval_every": "epochs between evaluations on eval_data() during training, as trained and low-rank (0: none)",
        "keep_best": "end with the weights of the best evaluation (low-rank accuracy under DeepTwist); needs "
                     "eval_every",
        "distill": "weight of knowledge distillation from the original model, in [0, 1] (0: labels only)",
        "temperature": "distillation's softening temperature"}

    epochs: int = 3
    lr: float = 0.01
    schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    reset_momentum: bool = False
    recalibrate_bn: int = 0
    rectify_bn: int = 0
    optimizer: str = "sgd"
    device: str = "cpu"
    amp: str = "none"
    channels_last: bool = False
    warmup: int = 0
    clip_grad: float = 0.0
    accumulate: int = 1
    eval_every: int = 0
    keep_best: bool = False
    distill: float = 0.0
    temperature: float = 4.0

    def __post_init__(self):
        if self.epochs < 0:
            raise SpecError(f"epochs must be >= 0, got {self.epochs}")
        if self.amp not in ("none", *AMP_DTYPES):
            raise SpecError(f"train: amp must be none, bf16 or fp16, got {self.amp!r}")
        if not (self.device == "cpu" or self.device.split(":")[0] == "cuda"):
            raise SpecError(f"train: device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device != "cpu" and not torch.cuda.is_available():
            raise SpecError(f"train: device={self.device}, but this torch sees no CUDA device; use device=cpu")
        if self.keep_best and not self.eval_every:
            raise SpecError("train: keep_best chooses among the evaluations of eval_every=N; give eval_every too")
        if self.accumulate < 1:
            raise SpecError(f"train: accumulate must be >= 1 (batches per optimizer step), got {self.accumulate}")
        if self.schedule not in SCHEDULES:
            raise SpecError(f"train: schedule must be {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise SpecError(f"train: optimizer must be sgd or adamw, got {self.optimizer!r}")
        if not 0 <= self.distill <= 1:
            raise SpecError(f"train: distill is a weight in [0, 1], got {self.distill}")
        if not 0 < self.temperature < float("inf"):
            raise SpecError(f"train: temperature must be a finite number > 0, got {self.temperature}")
        if self.optimizer == "adamw" and not self.momentum < 1:
            raise SpecError(f"train: with adamw, momentum is beta1 and must be < 1, got {self.momentum}")
        for key in ("lr", "momentum", "weight_decay", "recalibrate_bn", "rectify_bn", "warmup", "clip_grad",
                    "eval_every"):
            value = getattr(self, key)
            if not 0 <= value < float("inf"):
                raise SpecError(f"train: {key} must be a finite number >= 0, got {value}")


def projections(module: nn.Module) -> list[LowRankProjection]:
    return [m for m in module.modules() if isinstance(m, LowRankProjection)]


def final_projection(module: nn.Module) -> int:
    """Run each projection's final projection once; returns how many ran."""
    count = 0
    for p in projections(module):
        if not p.finalized:
            p.finalize_(module.get_parameter(p.weight_name))
            count += 1
    return count


@dataclass
class TrainResult:
    """`distortions` counts training steps at which at least one layer was projected."""

    epochs: int
    steps: int = 0
    distortions: int = 0
    final_projections: int = 0
    final_loss: float = float("nan")
    seconds: float = 0.0
    lr: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    # per distortion step: ||W - P(W)|| / ||W|| averaged over the layers it projected
    distortion_changes: list[float] = field(default_factory=list)
    accuracy_before_final_projection: float | None = None  # on eval data, when there is any
    adaptive_periods: list[int] = field(default_factory=list)  # S_D at the end, per layer with target_change
    # every eval_every epochs: {"epoch", "loss", "accuracy"[, "low_rank_accuracy"]}, see evaluate()
    evaluations: list[dict] = field(default_factory=list)
    kept_epoch: int | None = None  # keep_best: the epoch whose weights training ended with
    # one per process that trained (a resumed run has several): {"hardware", "device", "steps": [first, last],
    # "seconds"}, so a run begun on a GPU and finished on a CPU says so
    sessions: list[dict] = field(default_factory=list)
    teacher_seconds: float = 0.0  # distillation: time spent in the teacher's forwards
    # one per train stage of the training (several after a hand-off): {"stage", "epochs", "steps", "seconds",
    # "handoff"}
    phases: list[dict] = field(default_factory=list)
    # the optimizer's state by parameter name at the end (carried_state), for a hand-off; not saved
    carried: dict | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in
                ("epochs", "steps", "distortions", "final_projections", "final_loss", "seconds", "lr", "losses",
                 "distortion_changes", "accuracy_before_final_projection", "adaptive_periods", "evaluations",
                 "kept_epoch", "sessions", "teacher_seconds", "phases")}


def _first_nonfinite_parameter(module: nn.Module) -> str | None:
    return next((n for n, p in module.named_parameters() if not torch.isfinite(p).all()), None)


@dataclass
class BestWeights:
    """keep_best: the weights of the evaluation that scored best so far, by low-rank accuracy under
    DeepTwist (what stopping there would deploy), else accuracy; on the CPU, and in the checkpoint."""

    epoch: int = 0
    score: float = -1.0
    state: dict | None = None

    def offer(self, module: nn.Module, record: dict) -> None:
        score = record.get("low_rank_accuracy", record["accuracy"])
        if score > self.score:  # a tie keeps the earlier epoch
            self.epoch, self.score = record["epoch"], score
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def train(module: nn.Module, train_data: Callable[[], Iterable], epochs: int | None = None, *,
          config: TrainConfig | None = None, progress: bool = True, loss_fn=F.cross_entropy, finalize: bool = True,
          checkpointing: Checkpointing | None = None, shard: bool = True,
          eval_data: Callable[[], Iterable] | None = None, teacher: nn.Module | None = None,
          span: tuple[int, int] | None = None, carried: dict | None = None, **options) -> TrainResult:
    """Train `module` in place; `train_data()` is called once per epoch and yields (input, target).
    An object with `set_epoch(epoch)` (as DistributedSampler and CifarBatches have) is told its epoch.

    The hyperparameters are `config`, or TrainConfig's fields given here (`epochs`, `lr=`, ...); what each
    does is said there. Besides them:
    `checkpointing`: save at each epoch end, every `checkpointing.every` steps and on SIGINT/SIGTERM (then
    raise Stopped); resume exactly.
    Under torchrun the module trains as DistributedDataParallel, each rank on every world-size-th batch
    (`shard=False`: train_data() already gives each rank its own); rank 0 alone saves checkpoints.
    The module trains on `config.device` and returns to the CPU afterwards.
    `eval_data`: evaluated with `evaluate()` after every `eval_every`-th epoch and the last (under torchrun
    every rank must have eval_data: each takes its share of the batches).
    `teacher`: the model distillation learns from (`distill` > 0); it runs in eval mode without gradients
    and never changes.
    `span` (first epoch, total epochs): this run is epochs [first, first + epochs) of a longer schedule
    (a hand-off between train stages), so the learning rate goes on where the previous phase left it.
    `carried`: optimizer state by parameter name from the previous phase (`carried_state`); parameters
    of the same name and shape start with it.
    """
    c = config or TrainConfig(**options, **({} if epochs is None else {"epochs": epochs}))
    if config is not None and (options or epochs is not None):
        raise TypeError("train(): give the hyperparameters in config or as keyword arguments, not both")
    if c.keep_best and not (eval_data and c.eval_every):
        raise SpecError("train: keep_best needs evaluations during training: eval_every=N and eval_data() in "
                        "MODEL.py")
    torch.manual_seed(c.seed)
    np.random.seed(c.seed)
    random.seed(c.seed)
    device = distributed.local_device(c.device)
    module.to(device, memory_format=torch.channels_last if c.channels_last else torch.preserve_format)
    layout = _to_channels_last if c.channels_last else (lambda t: t)
    prepare = lambda t: layout(t.to(device))  # noqa: E731  (an input batch on this device, in its memory order)
    device_type = torch.device(device).type
    autocast = ((lambda: torch.autocast(device_type, dtype=AMP_DTYPES[c.amp])) if c.amp != "none" else nullcontext)
    scaler = torch.amp.GradScaler(device_type, enabled=c.amp == "fp16")
    optimizer = _optimizer(c.optimizer, [p for p in module.parameters() if p.requires_grad], c.lr, c.momentum,
                           c.weight_decay)
    if carried:
        _carry_over(module, optimizer, carried)
    if c.distill and teacher is None:
        raise SpecError("train: distill needs a teacher (the original model); the pipeline gives it as "
                        "RunContext.teacher")
    distillation = (Distillation(copy.deepcopy(teacher).to(device).eval().requires_grad_(False), c.distill,
                                 c.temperature) if c.distill else None)
    first, total = span or (0, c.epochs)
    result = TrainResult(c.epochs, lr=c.lr)
    at = {"epoch": 0, "batch": 0, "step": 0, "distortion_steps": 0, "loss_total": 0.0}
    saved = resume.resume(checkpointing, module, optimizer, scaler) if checkpointing else None
    best = BestWeights()
    if saved:
        result, at = TrainResult(**saved["result"]), saved["position"]
        best = BestWeights(**saved.get("best") or {})
        set_rng_state(saved["rng_epoch_start"] if at["batch"] else saved["rng"])
    start = time.perf_counter() - result.seconds
    result.sessions.append({"hardware": _hardware(device), "device": str(device), "steps": [at["step"], at["step"]],
                            "seconds": 0.0})
    module.train()
    net = distributed.wrap(module)
    projected = projections(module)
    with resume.deferred_stop() if checkpointing else nullcontext([]) as stop:
        step_distorted = False
        first_epoch, warned = at["epoch"], False

        def end_step(batches: int) -> None:
            """The optimizer step over the last `batches` batches' gradients, then what follows a step."""
            _optimizer_step(optimizer, scaler, batches, c.clip_grad)
            if step_distorted and c.rectify_bn:
                rng = rng_state()
                recalibrate_batchnorm(module, train_data, c.rectify_bn, prepare)
                set_rng_state(rng)
            if distributed.any_rank(bool(stop)):  # every rank stops after the same step
                bar.close()
                resume.save(checkpointing, module, optimizer, scaler, result, at, epoch_rng, start, best)
                raise Stopped(stop[0] if stop else signal.SIGTERM,
                              f"checkpoint saved in {checkpointing.directory}; continue with <option:resume>")
            if checkpointing and checkpointing.every and at["step"] % checkpointing.every == 0 \
                    and at["batch"] != per_epoch:  # the epoch's end saves anyway
                resume.save(checkpointing, module, optimizer, scaler, result, at, epoch_rng, start, best)

        for epoch in range(at["epoch"], c.epochs):
            epoch_rng = rng_state()
            clock, resumed_at, samples = time.perf_counter(), at["batch"], 0
            iterator, per_epoch = _epoch_batches(train_data, epoch, at["batch"], saved, shard)
            steps_per_epoch = -(-per_epoch // c.accumulate) if per_epoch else None
            if epoch == first_epoch and per_epoch:
                warned = _warn_unprojected(projected, (c.epochs - epoch) * steps_per_epoch - at["batch"] // c.accumulate)
            bar = tqdm(iterator, total=per_epoch, initial=at["batch"], desc=f"epoch {epoch + 1}/{c.epochs}",
                       disable=None if progress else True, leave=False, dynamic_ncols=True)
            for x, y in bar:
                micro = at["batch"] % c.accumulate
                if micro == 0:
                    done = (first + epoch + (at["batch"] // c.accumulate / steps_per_epoch if per_epoch else 0)) / total
                    at["step"] += 1
                    for group in optimizer.param_groups:
                        group["lr"] = c.lr * SCHEDULES[c.schedule](done) * min(1.0, at["step"] / (c.warmup or 1))
                    optimizer.zero_grad(set_to_none=True)
                ends = micro == c.accumulate - 1 or at["batch"] + 1 == per_epoch
                with autocast(), _counting(projected, micro == 0), \
                        (nullcontext() if ends or net is module else net.no_sync()):
                    loss, distorted = _forward_backward(module, net, projected, optimizer, scaler, loss_fn,
                                                        prepare(x), y.to(device), at["step"], result, c.reset_momentum,
                                                        distillation)
                if micro == 0:
                    step_distorted = distorted
                at["distortion_steps"] += distorted
                at["batch"] += 1
                at["loss_total"] += loss
                samples += len(y)
                bar.set_postfix(loss=f"{at['loss_total'] / at['batch']:.4f}", distortions=at["distortion_steps"],
                                refresh=False, **({"removed": f"{result.distortion_changes[-1]:.1%}"}
                                                  if at["distortion_steps"] else {}))
                if ends:
                    end_step(micro + 1)
            if at["batch"] % c.accumulate and per_epoch is None:  # the last step of an epoch of unknown length
                if net is not module:
                    distributed.average_gradients_(optimizer)
                end_step(at["batch"] % c.accumulate)
            bar.close()
            pace = _pace(time.perf_counter() - clock, distributed.total(samples)[0],
                         (at["batch"] - resumed_at) / max(at["batch"], 1), c.epochs - epoch - 1)
            if at["batch"] == 0:
                raise SpecError(f"train_data() yielded no batches in epoch {epoch + 1}; it must yield "
                                "(input, target) pairs every time it is called")
            result.losses.append(distributed.mean(at["loss_total"] / max(at["batch"], 1)))  # over all ranks' batches
            evaluated = ""
            if eval_data is not None and c.eval_every and ((epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs):
                result.evaluations.append({"epoch": epoch + 1, "loss": result.losses[-1],
                                           **evaluate(module, eval_data, prepare)})
                evaluated = _evaluation_text(result.evaluations[-1])
                if c.keep_best:
                    best.offer(module, result.evaluations[-1])
            log.info("epoch %d/%d: loss %.4f, %s%s", epoch + 1, c.epochs, result.losses[-1], pace, evaluated)
            at = {**at, "epoch": epoch + 1, "batch": 0, "loss_total": 0.0}
            if checkpointing:
                resume.save(checkpointing, module, optimizer, scaler, result, at, epoch_rng, start, best)
    if not warned:  # batches of unknown count: say it afterwards
        _warn_unprojected(projected, None)
    where = _first_nonfinite_parameter(module)
    if where:
        raise NonFiniteError(f"training ended with non-finite parameter {where} after step {at['step']}")
    result.steps = at["step"]
    result.distortions = at["distortion_steps"]
    result.adaptive_periods = [int(p.current_period) for p in projected if p.target_change]
    result.final_loss = result.losses[-1] if result.losses else float("nan")
    if c.keep_best and best.state is not None:
        result.kept_epoch = best.epoch
        if best.epoch != c.epochs:
            module.load_state_dict(best.state)
            log.info("kept the weights of epoch %d, the best evaluation (%.2f%%)", best.epoch, 100 * best.score)
    module.to("cpu", memory_format=torch.contiguous_format if c.channels_last else torch.preserve_format)
    if finalize:
        result.final_projections = final_projection(module)
        if c.recalibrate_bn and result.final_projections:
            recalibrate_batchnorm(module, train_data, c.recalibrate_bn)
    resume.clock(result, start, at["step"])
    result.carried = carried_state(module, optimizer)
    module.eval()
    return result


def _warn_unprojected(projected: list[LowRankProjection], steps: int | None) -> bool:
    """Warn when DeepTwist makes no projection in the `steps` training steps ahead (None: it made none in
    the training just ended): its weights never settle at low rank, and the final projection then makes
    the whole cut untrained. Returns whether it warned."""
    if not projected or any(int(p.distortions) for p in projected) or not distributed.is_main():
        return False
    wait = min(p.next_distortion(int(p.step)) - int(p.step) for p in projected)
    if steps is not None and wait <= steps:
        return False
    period = projected[0].period
    told = (f"trains {steps} steps and its first projection comes after {wait}" if steps is not None
            else f"made no projection in {int(projected[0].step)} training steps")
    log.warning("warning: DeepTwist %s (S_D = %d): the weights never settle at low rank, and the final projection "
                "cuts them untrained; set its period to %d or less (about 4 projections), or train longer", told,
                period, max(1, (steps if steps is not None else int(projected[0].step)) // 4))
    return True


def _epoch_batches(train_data, epoch: int, done: int, saved: dict | None, shard: bool) -> tuple[Iterable, int | None]:
    """This rank's batches of `epoch` and their count. After a resume, the `done` batches trained before
    the stop are replayed (the RNG is at the epoch's starting state) and the saved RNG state restored."""
    batches = train_data()
    if hasattr(batches, "set_epoch"):
        batches.set_epoch(epoch)
    count = len(batches) if hasattr(batches, "__len__") else None
    iterator = _named(iter(batches))
    iterator, count = distributed.shard(iterator, count) if shard else distributed.common_length(iterator, count)
    for _ in range(done):
        next(iterator)
    if done:
        set_rng_state(saved["rng"])
    return iterator, count


@dataclass
class Distillation:
    """Knowledge distillation from `teacher` (see train())."""

    teacher: nn.Module
    weight: float
    temperature: float

    def loss(self, loss_fn, scores: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The labels' loss blended with the KL divergence from the teacher's softened `target` scores."""
        t = self.temperature
        soft = F.kl_div(F.log_softmax(scores.float() / t, 1), F.log_softmax(target.float() / t, 1),
                        log_target=True, reduction="batchmean") * t ** 2
        return (1 - self.weight) * loss_fn(scores, y) + self.weight * soft


def carried_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's per-parameter state by parameter name, for the next phase of a hand-off."""
    names = {id(p): n for n, p in module.named_parameters()}
    return {"optimizer": type(optimizer).__name__,
            "state": {names[id(p)]: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v
                                     for k, v in state.items()}
                      for p, state in optimizer.state.items() if id(p) in names}}


def _carry_over(module: nn.Module, optimizer: torch.optim.Optimizer, carried: dict) -> int:
    """Give parameters that survived the hand-off (same name and shape) their optimizer state from the
    previous phase; returns how many got it."""
    if carried["optimizer"] != type(optimizer).__name__:
        log.warning("warning: the hand-off changes the optimizer (%s -> %s); its state starts afresh",
                    carried["optimizer"], type(optimizer).__name__)
        return 0
    count = 0
    for name, p in module.named_parameters():
        state = carried["state"].get(name)
        if state is not None and all(v.shape == p.shape for v in state.values() if torch.is_tensor(v) and v.dim()):
            optimizer.state[p] = {k: v.to(p.device, copy=True) if torch.is_tensor(v) else v for k, v in state.items()}
            count += 1
    return count


def _named(batches: Iterable) -> Iterable:
    """The batches of train_data(); an error of the user's loader becomes one line that names it."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            raise ModelFileError(f"train_data() raised {type(e).__name__} while giving a batch: "
                                 f"{first_line(e)[:200]}") from None
        yield batch


def _to_channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _optimizer(name: str, params: list, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)


@contextmanager
def _counting(projected: list[LowRankProjection], on: bool):
    """DeepTwist's projections count (and may project) in the forwards inside only when `on`: the first
    batch of an optimizer step."""
    for p in projected:
        p.counting = on
    try:
        yield
    finally:
        for p in projected:
            p.counting = True


def _forward_backward(module, net, projected: list[LowRankProjection], optimizer, scaler, loss_fn, x, y, step: int,
                      result: TrainResult, reset_momentum: bool,
                      distillation: Distillation | None = None) -> tuple[float, bool]:
    """One batch's forward and backward through `net` (the module, or its DDP wrapper), its gradients
    added to those already there; returns the loss and whether a DeepTwist distortion happened in it."""
    scores = _scores(net(x))
    if distillation is None:
        target = None
    else:  # the teacher's forward is the extra cost of a step, and counted as such
        start = time.perf_counter()
        with torch.no_grad():
            target = _scores(distillation.teacher(x))
        result.teacher_seconds += time.perf_counter() - start
    try:
        loss = loss_fn(scores, y) if target is None else distillation.loss(loss_fn, scores, y, target)
    except (IndexError, RuntimeError):
        if scores.dim() == 2:
            check_targets(y, scores.shape[1], "train_data()")
        raise
    changes = [float(p.change) for p in projected if p.distorted]
    distorted = bool(changes)
    if distorted:
        result.distortion_changes.append(sum(changes) / len(changes))
        if reset_momentum:
            _clear_momentum(module, optimizer)
    if not torch.isfinite(loss):
        where = _first_nonfinite_parameter(module)
        raise NonFiniteError(f"training stopped at step {step}: loss is {loss.item()}"
                             + (f", parameter {where} is not finite" if where else "")
                             + "; lower <option:lr> or raise the ranks")
    scaler.scale(loss).backward()
    return loss.item(), distorted


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batches: int,
                    clip_grad: float) -> None:
    """Step on the mean of the gradients that `batches` backwards added up (and `scaler` scaled)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if batches > 1:
        for p in params:
            p.grad.div_(batches)
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()


def _hardware(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else cpu_model()


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, train_data: Callable[[], Iterable], batches: int,
                          prepare: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> int:
    """Re-estimate BatchNorm running statistics for the current weights (after a projection changed
    them): reset, then average over `batches` training-mode forwards without grad of the inputs
    (after `prepare`: device, memory order). Returns batches used."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches < 1:
        return 0
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    used = 0
    try:
        with in_mode(module, training=True):
            for x, _ in train_data():
                module(prepare(x))
                used += 1
                if used >= batches:
                    break
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
    return used


def evaluate(module: nn.Module, eval_data: Callable[[], Iterable],
             prepare: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict:
    """Top-1 accuracy on eval_data() as the weights stand and, while DeepTwist projections are not final,
    `low_rank_accuracy`: with every projected kernel replaced by its low-rank reconstruction, which is
    what stopping here would deploy (before any BatchNorm recalibration). Under torchrun each rank
    evaluates every world-size-th batch and the counts are summed. The weights and the random streams
    are left as they were, so training goes on as it would have without the evaluation."""
    def shared_accuracy() -> float:
        correct, seen = distributed.total(*correct_and_seen(module, distributed.my_share(eval_data()), prepare))
        return correct / max(seen, 1)

    rng = rng_state()
    record = {"accuracy": shared_accuracy()}
    pending = [p for p in projections(module) if not p.finalized]
    if pending:
        with _reconstructed(module, pending):
            record["low_rank_accuracy"] = shared_accuracy()
    set_rng_state(rng)
    return record


def _pace(seconds: float, samples: int, share: float, epochs_left: int) -> str:
    """'41 s, 1,210 samples/s, 3.4 min left': an epoch's training time (of which `share` ran in this
    process, the rest before a resume), samples per second over all ranks, and what the remaining epochs
    take at this pace (evaluations not counted)."""
    left = f", {_duration(seconds / max(share, 1e-9) * epochs_left)} left" if epochs_left else ""
    return f"{_duration(seconds)}, {samples / max(seconds, 1e-9):,.0f} samples/s{left}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _evaluation_text(record: dict) -> str:
    low_rank = record.get("low_rank_accuracy")
    return f"; eval accuracy {record['accuracy']:.2%}" + (f", low-rank {low_rank:.2%}" if low_rank is not None else "")


@contextmanager
def _reconstructed(module: nn.Module, pending: list[LowRankProjection]):
    """The kernels of `pending` replaced by their low-rank reconstructions inside, restored after (this
    rank alone: no broadcast, unlike a projection)."""
    kernels = [module.get_parameter(p.weight_name) for p in pending]
    saved = [w.detach().clone() for w in kernels]
    with torch.no_grad():
        for p, w in zip(pending, kernels):
            w.copy_(p.plan.reconstruct(w, p.stats))
    try:
        yield
    finally:
        with torch.no_grad():
            for w, original in zip(kernels, saved):
                w.copy_(original)


def _clear_momentum(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for p in projections(module):
        state = optimizer.state.get(module.get_parameter(p.weight_name), {})
        for key in ("momentum_buffer", "exp_avg"):  # SGD's velocity, AdamW's first moment
            if state.get(key) is not None:
                state[key].zero_()


def _scores(out) -> torch.Tensor:
    """What the training loss takes from a model's output: a tensor as it is (any loss_fn), the class
    scores of a dict or tuple."""
    return out if torch.is_tensor(out) else class_scores(out, "train_data()")


