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
import functools
import importlib
import logging
import pkgutil
import re
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch.fx as fx

from twistc.errors import SpecError, TwistcError

log = logging.getLogger(__name__)

REGISTRY: dict[str, type["Stage"]] = {}  # name -> class: each pass and stage registers itself (@register)
PRESETS: dict[str, "Preset"] = {}  # name -> preset (twistc/passes/presets.py registers them)


def register(cls):
    """Class decorator of a pass or stage: specs may name it by its `name`."""
    known = REGISTRY.setdefault(cls.name, cls)
    if known is not cls:
        raise TypeError(f"two stages are named {cls.name!r}: {known.__qualname__} and {cls.__qualname__}")
    return cls


@functools.cache
def _import_passes() -> None:
    package = importlib.import_module("twistc.passes")
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)


def registry() -> dict[str, type["Stage"]]:
    """Every pass and stage by name, in alphabetical order (importing the modules of twistc.passes
    registers theirs, and the presets)."""
    _import_passes()
    return dict(sorted(REGISTRY.items()))


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
    run_defaults: ClassVar[tuple[str, ...]] = ()  # options a run's settings (the CLI's flags) fill when unwritten

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
    if name not in registry():
        known = ", ".join(list(registry()) + list(PRESETS))
        raise SpecError(f"unknown pass '{name}' (known: {known}; `twistc passes` describes them)")
    return REGISTRY[name]


@dataclass(frozen=True)
class Item:
    """A pipeline item as written: its stage class and the options written (as text). A run's settings
    fill the options the stage declares in `run_defaults` (with_defaults); `stage()` then makes the stage,
    which checks the options together (plan-latency's target, say, may come from --ratio)."""

    cls: type[Stage]
    options: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def of(cls: type[Stage], **options) -> "Item":
        return Item(cls, tuple((key, format_value(value)) for key, value in options.items()))

    @property
    def name(self) -> str:
        return self.cls.name

    @property
    def given(self) -> dict[str, str]:
        return dict(self.options)

    def spec(self) -> str:
        return f"{self.name}{{{','.join(f'{k}={v}' for k, v in self.options)}}}" if self.options else self.name

    def with_defaults(self, values: dict[str, Any], also: Iterable[str] = ()) -> "Item":
        """The item with `values` for the options its stage declares in `run_defaults` (and those named in
        `also`) that it does not write, unless it writes another option of the same `exclusive` group."""
        given = self.given
        names = (set(self.cls.run_defaults) | set(also)) & {f.name for f in dataclasses.fields(self.cls)}
        taken = {k for group in self.cls.exclusive if set(group) & set(given) for k in group}
        extra = tuple((k, format_value(v)) for k, v in values.items()
                      if k in names and v is not None and k not in given and k not in taken)
        return Item(self.cls, self.options + extra)

    def stage(self) -> Stage:
        return self.cls.from_options(self.given)


def parse_item(text: str) -> Item:
    """One spec item (not a preset)."""
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
    return Item(stage_class(name), tuple(options.items()))


@dataclass(frozen=True)
class Preset:
    """A named pipeline: its items as written, before a run's settings fill them; the flags say how the
    CLI's --epochs, --handoff and --target-speedup / --max-drop extend it (twistc.commands.preset_items)."""

    name: str
    items: tuple[Item, ...]
    summary: str
    fine_tunes: bool = False  # with epochs, a train stage goes in before `fold` (which freezes BatchNorm)
    hands_off: bool = False  # its training in the original shape may hand off to the factors' training
    plans: bool = False  # a latency or accuracy target puts plan-latency in front

    def __str__(self) -> str:
        items = [item.spec() for item in self.items]
        if self.fine_tunes:
            at = next(i for i, item in enumerate(self.items) if item.name == "fold")
            return ",".join(items[:at]) + "[,train]," + ",".join(items[at:])
        return ",".join(items)


def register_preset(preset: Preset) -> None:
    known = PRESETS.setdefault(preset.name, preset)
    if known is not preset:
        raise TypeError(f"two presets are named {preset.name!r}")


def presets() -> dict[str, Preset]:
    registry()
    return PRESETS


def items_of(spec: str) -> list[Item]:
    """The items of a spec, each preset as its items."""
    known = presets()
    return [item for text in split_items(spec) for item in (known[text].items if text in known else [parse_item(text)])]


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
        return cls([item.stage() for item in items_of(spec)])

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
    return ([(name, cls.summary, "") for name, cls in registry().items()]
            + [(name, preset.summary, str(preset)) for name, preset in PRESETS.items()])
