"""Tracing: nn.Module -> torch.fx.GraphModule with shapes attached.

A submodule whose forward cannot be traced becomes an opaque leaf (call_module) and is
reported; the rest of the model is still traced, so convs elsewhere can be lowered. A model
whose own forward cannot be traced is an error that names the module and the offending line.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import traceback
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from twistc.decomp.cost import ConvGeometry
from twistc.errors import TraceError, first_line
from twistc.decomp.tucker import TuckerConv
from twistc.projection import LowRankProjection
from twistc.state import META_KEY, CompileState, LayerRecord

log = logging.getLogger(__name__)
_TORCH_DIR = str(Path(torch.__file__).parent)
_TWISTC_DIR = str(Path(__file__).parent)


def _user_frame(exc: BaseException) -> str:
    """'file:line: code' of the innermost frame outside torch and twistc."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith((_TORCH_DIR, _TWISTC_DIR))]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def _reason(exc: BaseException) -> str:
    message = first_line(exc)
    return f"{message} ({_user_frame(exc)})"


def _last_node(graph: fx.Graph) -> fx.Node | None:
    return next(iter(reversed(graph.nodes)), None)  # under torch 2.11 reversed() gives a list, not an iterator


class LeafTolerantTracer(fx.Tracer):
    """Traces through submodules, turning those that fail into leaves."""

    def __init__(self):
        super().__init__()
        self.leaves: dict[str, str] = {}
        self._erased: set[fx.Node] = set()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (LowRankProjection, TuckerConv)) or qualname in self.leaves or _switches_on_training(m):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        mark = _last_node(self.graph)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # any failure inside: keep the module whole
            self._erase_after(mark)
            self.leaves[qualname] = _reason(exc)
            log.info("cannot trace into %s; keeping it as a leaf: %s", qualname, self.leaves[qualname])
            return self.create_proxy("call_module", qualname, args, kwargs)

    def _erase_after(self, mark: fx.Node | None) -> None:
        while True:
            last = _last_node(self.graph)
            if last is None or last is mark:
                return
            self._erased.add(last)
            self.graph.erase_node(last)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._erased:  # proxies cached while tracing a failed submodule point at erased nodes
            for key in [k for k, p in parameter_proxy_cache.items() if p.node in self._erased]:
                del parameter_proxy_cache[key]
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _switches_on_training(m: nn.Module) -> bool:
    """A module without parameters whose forward reads `self.training` (DropPath, stochastic depth): traced
    through in eval mode it would vanish from the graph that the train stages train, so it stays a leaf,
    which follows the model's train() and eval() at run time."""
    if any(True for _ in m.parameters()) or type(m).__module__.startswith("torch.nn"):
        return False
    try:
        return "self.training" in inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return False


_DROPOUTS = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d, F.dropout3d: nn.Dropout3d,
             F.alpha_dropout: nn.AlphaDropout}


def _dropout_as_modules(gm: fx.GraphModule, training: bool) -> None:
    """`F.dropout(x, p, self.training)` traced in eval mode records training=False for good; each such call
    becomes a dropout module, which drops in the train stages and passes through once the model is in
    eval mode, as the user's code does."""
    for node in list(gm.graph.nodes):
        kind = _DROPOUTS.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        args = dict(zip(("input", "p", "training", "inplace"), node.args), **node.kwargs)
        if args.get("training", True) is not False or not isinstance(args.get("p", 0.5), (int, float)):
            continue  # always on (as the user wrote it), or a probability computed at run time
        name = f"dropout_{node.name}"
        gm.add_submodule(name, kind(args.get("p", 0.5)).train(training))  # in the mode of the traced model
        with gm.graph.inserting_before(node):
            module = gm.graph.call_module(name, (args["input"],))
        module.meta = dict(node.meta)
        node.replace_all_uses_with(module)
        gm.graph.erase_node(node)
    gm.recompile()


def trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Trace `model`; the GraphModule shares its parameters, like torch.fx.symbolic_trace."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    tracer = LeafTolerantTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        raise TraceError(
            f"cannot trace {type(model).__name__}.forward: {_reason(exc)}; make the top-level forward "
            "traceable (untraceable code can move into a submodule, which twistc keeps as a leaf)"
        ) from None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _dropout_as_modules(gm, model.training)
    try:
        outputs = shape_prop(gm, example_inputs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise TraceError(f"running {type(model).__name__} on example_inputs() failed: "
                         f"{type(cause).__name__}: {first_line(cause)}") from None
    state = CompileState(example_inputs, output_shapes(outputs), leaves=dict(tracer.leaves))
    gm.meta[META_KEY] = state
    _record_convs(gm, state)
    for path, why in state.leaves.items():
        log.warning("kept %s as an opaque leaf: %s", path, why)
    return gm


def output_shapes(outputs) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    fx.node.map_aggregate(outputs, lambda t: shapes.append(tuple(t.shape)) if torch.is_tensor(t) else None)
    return shapes


def shape_prop(gm: fx.GraphModule, example_inputs: tuple):
    """ShapeProp in eval mode under no_grad (projections stay identities); training flags restored."""
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:  # ShapeProp prints a traceback of its own before raising; the caller reports the error
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            return ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _record_convs(gm: fx.GraphModule, state: CompileState) -> None:
    from twistc.convs import conv_sites  # late import: convs imports this module's state helpers

    owners: dict[int, str] = {}  # id(weight) -> the first conv using it
    for site in conv_sites(gm):
        if site.name in state.layers:  # the same conv applied again
            continue
        owner = owners.setdefault(id(site.weight(gm)), site.name)
        state.layers[site.name] = LayerRecord(site.name, site.geometry,
                                              shared_with=owner if owner != site.name else None)
    for node in gm.graph.nodes:  # conv kinds no decomposition handles yet, recorded with the reason
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, UNSUPPORTED_CONVS) and node.target not in state.layers:
            state.layers[node.target] = LayerRecord(node.target, _any_conv_geometry(module), skip_reason=(
                f"{type(module).__name__}: no decomposition handles this layer kind yet (Conv2d, Conv1d and Linear only)"))
        if isinstance(module, nn.MultiheadAttention):
            _record_attention(state, node.target, module)
    for path, why in state.leaves.items():
        leaf = gm.get_submodule(path)
        for sub, m in leaf.named_modules(prefix=path):
            if isinstance(m, nn.Conv2d):
                g = _module_geometry(m)
                state.layers[sub] = LayerRecord(sub, g, skip_reason=f"inside untraceable module {path}: {why}")


UNSUPPORTED_CONVS = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _record_attention(state: CompileState, path: str, mha: nn.MultiheadAttention) -> None:
    """nn.MultiheadAttention runs as one call (F.multi_head_attention_forward), so no pass reaches its
    projections; they are listed with the reason."""
    why = ("inside nn.MultiheadAttention, which runs as one fused call (its q, k and v projections are one "
           "in_proj_weight); write attention with nn.Linear layers to compress them")
    shapes = {"in_proj": (mha.in_proj_weight.shape if mha.in_proj_weight is not None else None),
              "out_proj": mha.out_proj.weight.shape}
    for name, shape in shapes.items():
        if shape is not None:
            state.layers[f"{path}.{name}"] = LayerRecord(
                f"{path}.{name}", ConvGeometry(shape[0], shape[1], (1, 1), kind="Linear"), skip_reason=why)


def _any_conv_geometry(m: nn.Module) -> ConvGeometry:
    """A conv of any kind as counted in the report: its kernel's taps folded into one 2-D kernel."""
    kernel = tuple(m.kernel_size)
    kernel = (kernel[0], math.prod(kernel[1:]))
    return ConvGeometry(m.out_channels, m.in_channels, kernel, m.groups)


def _module_geometry(m: nn.Conv2d) -> ConvGeometry:
    # Inside a leaf no shapes are known; the cost then counts one output pixel.
    return ConvGeometry(m.out_channels, m.in_channels, tuple(m.kernel_size), m.groups)
