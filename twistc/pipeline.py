"""Pass infrastructure: passes, stages, the registry, and pipeline spec strings.

A pipeline is written as a spec string, e.g.
    deeptwist{decomp=tucker,ratio=4,period=200},train{epochs=3},lower,cleanup
Each item is a registered pass or stage with options in braces. Options are the fields of a
frozen dataclass; a spec parses into those objects and prints back exactly as written. Every item runs
as `run(gm, ctx) -> PassResult` and reports honestly whether it changed anything; a Pass is the common
kind, a graph rewrite `pass(gm)` (given the run's context, its data, when it takes one). After every
item the pipeline verifies the graph.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import re
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch.fx as fx

from twistc.errors import SpecError, TwistcError

log = logging.getLogger(__name__)

REGISTRY = {
    "calibrate": "twistc.passes.calibrate:Calibrate",
    "plan-latency": "twistc.passes.plan_latency:PlanLatency",
    "deeptwist": "twistc.passes.deeptwist:DeepTwist",
    "lower": "twistc.passes.lower:Lower",
    "lower-conv-tucker": "twistc.passes.lower_aliases:LowerConvTucker",
    "lower-conv-svd": "twistc.passes.lower_aliases:LowerConvSvd",
    "lower-conv-tiled-lowrank": "twistc.passes.lower_aliases:LowerConvTiledLowrank",
    "lower-conv-cp": "twistc.passes.lower_aliases:LowerConvCp",
    "lower-linear-svd": "twistc.passes.lower_aliases:LowerLinearSvd",
    "fold": "twistc.passes.fold:Fold",
    "cleanup": "twistc.passes.cleanup:Cleanup",
    "train": "twistc.passes.train:Train",
}

# name -> (expansion, one-line summary). "tucker" gains ",train" when epochs > 0 (before `fold`, which
# freezes BatchNorm into the convs).
PRESETS = {
    "tucker": ("lower,fold,cleanup",
               "conventional: Tucker-2 for kxk convs, SVD pairs for 1x1 convs, Linear layers and convs Tucker leaves, "
               "then fine-tune the decomposed model (adds train when epochs > 0)"),
    "deeptwist-tucker": ("deeptwist{decomp=natural},train,lower,fold,cleanup",
                         "DeepTwist: train in the original shape with periodic projections (Tucker-2 for kxk convs, "
                         "SVD for 1x1 convs and Linear layers), then lower"),
    "deeptwist-svd": ("deeptwist{decomp=svd},train,lower,fold,cleanup",
                      "DeepTwist with SVD of each conv's lowered (im2col) matrix and each Linear weight, lowered "
                      "to conv pairs and Linear pairs"),
    "deeptwist-cp": ("deeptwist{decomp=cp},train,lower,fold,cleanup",
                     "DeepTwist with CP projections (Lebedev et al. 2015), lowered to 1x1, kh x 1, 1 x kw and 1x1 convs"),
    "deeptwist-tiled-svd": ("deeptwist{decomp=tiled-svd},train,lower,fold,cleanup",
                            "DeepTwist with tiled SVD of each lowered matrix, lowered to tiled GEMMs or grouped convs"),
}


@dataclass(frozen=True)
class PassResult:
    module: fx.GraphModule
    modified: bool
    rewrites: int = 0


@dataclass
class RunContext:
    """What stages may use besides the graph: the user's data and how to show progress."""

    train_data: Callable[[], Any] | None = None
    eval_data: Callable[[], Any] | None = None
    progress: bool = True
    results: dict[str, Any] = field(default_factory=dict)  # stage outputs: results["train"], results["seconds"]
    checkpoint: str | None = None  # folder where `train` saves checkpoints
    checkpoint_every: int = 0  # also save after every that many optimizer steps (0: epoch ends only)
    resume: bool = False  # continue from the checkpoint there
    pipeline: str = ""  # the spec being run (set by Pipeline.run); checkpoints record it
    train_data_sharded: bool = False  # under torchrun: train_data() already yields only this rank's batches
    status: Callable[[str], None] = lambda msg: None  # told which stage runs now
    teacher: Any = None  # the original model, for distillation (Pipeline.run keeps a copy when none is given)
    stages: list = field(default_factory=list)  # the pipeline being run (set by Pipeline.run)


@dataclass(frozen=True)
class Stage:
    """An item of a pipeline spec: a frozen dataclass whose fields are its options."""

    name: ClassVar[str]
    summary: ClassVar[str]
    writes_plan: ClassVar[bool] = False  # later passes take ranks and layout from the plan it writes
    option_help: ClassVar[dict[str, str]] = {}  # option -> what it means, for `twistc passes NAME`
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = ()  # groups of options of which one at most is given

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "Stage":
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, raw in options.items():
            if key not in names:
                known = ", ".join(sorted(names)) or "none"
                raise SpecError(f"{cls.name} has no option '{key}' (options: {known})")
            values[key] = parse_value(raw, hints[key], f"{cls.name}{{{key}=...}}")
        try:
            stage = cls(**values)
        except (TypeError, ValueError, TwistcError) as e:
            message = str(e)
            raise SpecError(message if message.startswith(f"{cls.name}:") else f"{cls.name}: {message}") from None
        object.__setattr__(stage, "_given", dict(options))
        return stage

    @property
    def given(self) -> dict[str, str]:
        """The options written in the spec (name -> text as written)."""
        return getattr(self, "_given", None) or {
            f.name: format_value(getattr(self, f.name)) for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default}

    def spec(self) -> str:
        options = ",".join(f"{k}={v}" for k, v in self.given.items())
        return f"{self.name}{{{options}}}" if options else self.name

    def needs(self) -> tuple[str, ...]:
        """The MODEL.py functions this item uses besides model() and example_inputs()."""
        return ()

    def check_order(self, before: list["Stage"], after: list["Stage"]) -> None:
        """Raise SpecError when the items around this one break a rule every pipeline obeys (Pipeline.run checks)."""

    def check_complete(self, before: list["Stage"], after: list["Stage"]) -> None:
        """Raise SpecError when a whole compilation (the CLI's) lacks what this item needs around it; a pipeline
        run from Python may leave such steps to the caller (its own training loop, its own lowering)."""

    def run(self, gm: fx.GraphModule, ctx: RunContext) -> PassResult:
        """The one protocol Pipeline.run speaks: the stage's work on the graph module, with the run's context."""
        raise NotImplementedError


@dataclass(frozen=True)
class Pass(Stage):
    """A graph rewrite: GraphModule -> PassResult. A pass with `takes_context` is also given the RunContext
    (the user's data), as `pass(gm, ctx)`."""

    takes_context: ClassVar[bool] = False

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, ctx: RunContext) -> PassResult:
        return self(gm, ctx) if self.takes_context else self(gm)


def _strip_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def parse_value(raw: str, tp, where: str):
    tp = _strip_optional(tp)
    try:
        if tp is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if tp in (int, float, str):
            return tp(raw)
        if typing.get_origin(tp) is tuple:
            return tuple(int(p) for p in raw.split("x"))
    except ValueError:
        raise SpecError(f"{where}: cannot read {raw!r} as {getattr(tp, '__name__', tp)}") from None
    raise SpecError(f"{where}: unsupported option type {tp}")


def format_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


_ITEM = re.compile(r"^([a-z][a-z0-9-]*)(?:\{(.*)\})?$", re.S)


def split_items(spec: str) -> list[str]:
    """Split at commas outside braces."""
    items, depth, current = [], 0, ""
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced '}}' in pipeline spec {spec!r}")
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    if depth:
        raise SpecError(f"unbalanced '{{' in pipeline spec {spec!r}")
    items.append(current.strip())
    return items


def stage_class(name: str) -> type[Stage]:
    if name not in REGISTRY:
        known = ", ".join(list(REGISTRY) + list(PRESETS))
        raise SpecError(f"unknown pass '{name}' (known: {known}; `twistc passes` describes them)")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def parse_item(text: str, defaults: dict[str, Any] | None = None) -> Stage:
    """One spec item; `defaults` fill options that the item has and does not write, unless it writes
    another option of the same `exclusive` group."""
    match = _ITEM.match(text)
    if not match:
        raise SpecError(f"cannot read pipeline item {text!r}; write name or name{{key=value,...}}")
    name, body = match.group(1), match.group(2)
    options = {}
    for part in filter(None, (p.strip() for p in (body or "").split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"option {part!r} of {name} is not key=value")
        if key.strip() in options:
            raise SpecError(f"option '{key.strip()}' of {name} is given twice; keep one")
        options[key.strip()] = value.strip()
    cls = stage_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    taken = {k for group in cls.exclusive if set(group) & set(options) for k in group}
    extra = {k: format_value(v) for k, v in (defaults or {}).items()
             if k in fields and v is not None and k not in taken}
    stage = cls.from_options({**extra, **options})
    object.__setattr__(stage, "_given", {**options, **{k: v for k, v in extra.items() if k not in options}})
    return stage


def expand_presets(spec: str) -> str:
    """Presets replaced by their pipelines, as written (the CLI's flags fill and extend them: see
    twistc.commands.preset_pipeline)."""
    return ",".join(PRESETS[item][0] if item in PRESETS else item for item in split_items(spec))


class Pipeline:
    def __init__(self, stages: list[Stage]):
        self.stages = list(stages)

    def check_order(self) -> None:
        """The rules on the order of items that every pipeline obeys (fold after train, a hand-off after a train)."""
        for i, stage in enumerate(self.stages):
            stage.check_order(self.stages[:i], self.stages[i + 1:])

    def check_whole(self) -> None:
        """For a pipeline that is a whole compilation (the CLI's): the order, and every item's needs on the items
        around it (deeptwist a train stage after it, plan-latency a lowering pass for each form it may choose)."""
        self.check_order()
        for i, stage in enumerate(self.stages):
            stage.check_complete(self.stages[:i], self.stages[i + 1:])

    def needs(self) -> tuple[str, ...]:
        """The MODEL.py functions the pipeline uses besides model() and example_inputs()."""
        return tuple(dict.fromkeys(need for stage in self.stages for need in stage.needs()))

    @classmethod
    def parse(cls, spec: str) -> "Pipeline":
        if not spec.strip():
            raise SpecError("empty pipeline spec")
        return cls([parse_item(item) for item in split_items(expand_presets(spec))])

    def __str__(self) -> str:
        return ",".join(stage.spec() for stage in self.stages)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def run(self, gm: fx.GraphModule, ctx: RunContext | None = None) -> fx.GraphModule:
        """Run every stage in order, verifying the graph after each; returns the final module."""
        from twistc.verify import verify

        self.check_order()
        ctx = ctx or RunContext()
        ctx.pipeline, ctx.stages = str(self), self.stages
        if ctx.teacher is None and any(getattr(s, "needs_teacher", False) for s in self.stages):
            ctx.teacher = copy.deepcopy(gm).eval()  # the model as it comes in: the original, before any pass
        done: list[str] = []
        verify(gm, "the traced model")
        for stage in self.stages:
            ctx.status(f"running {stage.spec()}")
            start = time.perf_counter()
            result = stage.run(gm, ctx)
            gm = result.module
            gm.recompile()
            outcome = f"{result.rewrites} rewrites" if result.rewrites else "done" if result.modified else "no change"
            before = ", ".join(done) or "nothing"
            verify(gm, f"pass '{stage.spec()}' (after: {before})")
            seconds = time.perf_counter() - start
            ctx.results.setdefault("seconds", {})[stage.spec()] = seconds
            log.info("%s: %s in %.2fs", stage.spec(), outcome, seconds)
            done.append(stage.spec())
        return gm


def describe() -> list[tuple[str, str, str]]:
    """(name, summary, expansion) of every pass, stage and preset, for `twistc passes`."""
    rows = [(name, stage_class(name).summary, "") for name in REGISTRY]
    rows += [(name, summary, expansion.replace(",fold", "[,train],fold") if name == "tucker" else expansion)
             for name, (expansion, summary) in PRESETS.items()]
    return rows

