"""Finding 2-D convolutions in a GraphModule, whether nn.Conv2d modules or F.conv2d on parameters, and
Linear layers (nn.Linear or F.linear on parameters), which are 1x1 convs over their tokens.

Passes match `ConvSite`s, check them, and rewrite them with the helpers here, so that each pass
file only wires its math into the graph.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from twistc.decomp.cost import ConvGeometry, pair
from twistc.projection import LowRankProjection

_CONV_FUNCTIONS = (F.conv2d, torch.conv2d, F.conv1d, torch.conv1d)
_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)
_MATMULS = (operator.matmul, torch.matmul)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@dataclass
class ConvSite:
    """One conv node and everything a pass needs to know about it."""

    node: fx.Node
    name: str                          # qualified parameter name without '.weight'
    weight_name: str                   # qualified name of the weight parameter
    bias_name: str | None
    geometry: ConvGeometry             # its shape and sampling
    projection: LowRankProjection | None = None
    lowered_to: str | None = None  # set when a lowering replaced it: the path of the lowered module
    weight_reader: fx.Node | None = None  # the node that reads the weight, when not `node` (x @ W.T: the .T)

    @property
    def input(self) -> fx.Node:
        """The conv's input as the graph has it now (an earlier rewrite may have replaced that node)."""
        return self.node.args[0] if self.node.args else self.node.kwargs["input"]

    def weight(self, gm: fx.GraphModule) -> nn.Parameter:
        return gm.get_parameter(self.weight_name)

    def bias(self, gm: fx.GraphModule) -> torch.Tensor | None:
        return gm.get_parameter(self.bias_name) if self.bias_name else None

    @property
    def kind(self) -> str:
        return self.geometry.kind

    @property
    def is_module(self) -> bool:
        return self.node.op == "call_module"



def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _geometry(weight: torch.Tensor, groups: int, site_in: fx.Node, node: fx.Node, sampling: tuple,
              padding_mode: str = "zeros") -> ConvGeometry:
    """A Conv2d's geometry; a Conv1d's as the Conv2d with kernel (k, 1) over (length, 1) pixels."""
    t, s_per_group, *kernel = weight.shape
    in_shape, out_shape = _shape(site_in), _shape(node)
    pad = (1,) * (3 - len(kernel))  # (length,) -> (length, 1)
    in_hw = tuple(in_shape[2:]) + pad[1:] if in_shape else (1, 1)
    out_hw = tuple(out_shape[2:]) + pad[1:] if out_shape else (1, 1)
    stride, padding, dilation = _sampling(*sampling, one_d=len(kernel) == 1)
    return ConvGeometry(t, s_per_group * groups, tuple(kernel) + pad[1:], groups, in_hw, out_hw,
                        "Conv1d" if len(kernel) == 1 else "Conv2d", stride, padding, dilation, padding_mode)


def _module_site(gm: fx.GraphModule, node: fx.Node) -> ConvSite | None:
    m = gm.get_submodule(node.target)
    if type(m) not in (nn.Conv2d, nn.Conv1d):
        return None
    return ConvSite(node, node.target, f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
                    _geometry(m.weight, m.groups, node.args[0], node, (m.stride, m.padding, m.dilation),
                              m.padding_mode))


def _sampling(stride, padding, dilation, one_d: bool) -> tuple:
    """Stride, padding and dilation as pairs; a Conv1d's as the Conv2d's with kernel (k, 1)."""
    if not one_d:
        return pair(stride), pair(padding), pair(dilation)

    def along_rows(v, fill: int):
        return v if isinstance(v, str) else (v if isinstance(v, int) else v[0], fill)

    return along_rows(stride, 1), along_rows(padding, 0), along_rows(dilation, 1)


def _parameter_operands(gm: fx.GraphModule, weight, bias) -> tuple | None:
    """(weight parameter, its qualified name, the bias's, the projection in between or None), when the
    weight is a parameter read through get_attr (maybe through a DeepTwist projection) and the bias is
    one or None."""
    projection = None
    if isinstance(weight, fx.Node) and weight.op == "call_module":
        module = gm.get_submodule(weight.target)
        if isinstance(module, LowRankProjection):
            projection, weight = module, weight.args[0]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    try:
        w = gm.get_parameter(weight.target)
    except AttributeError:
        return None
    return w, weight.target, bias.target if bias is not None else None, projection


def _layer_name(weight_name: str) -> str:
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def _function_site(gm: fx.GraphModule, node: fx.Node) -> ConvSite | None:
    args = dict(_CONV_DEFAULTS)
    args.update(zip(_CONV_ARGS, node.args))
    args.update(node.kwargs)
    operands = _parameter_operands(gm, args["weight"], args["bias"])
    one_d = node.target in (F.conv1d, torch.conv1d)
    if operands is None or operands[0].dim() != (3 if one_d else 4):
        return None
    w, weight_name, bias_name, projection = operands
    sampling = (args["stride"], args["padding"], args["dilation"])
    return ConvSite(node, _layer_name(weight_name), weight_name, bias_name,
                    _geometry(w, args["groups"], args["input"], node, sampling), projection)


def _linear_geometry(weight: torch.Tensor, x: fx.Node) -> ConvGeometry:
    shape = _shape(x)
    tokens = math.prod(shape[1:-1]) if shape else 1
    return ConvGeometry(weight.shape[0], weight.shape[1], (1, 1), 1, (tokens, 1), (tokens, 1), kind="Linear")


def _transposed(node) -> fx.Node | None:
    """X for a node computing X.T or X.t(), else None."""
    if isinstance(node, fx.Node) and ((node.op == "call_function" and node.target is getattr and node.args[1] == "T")
                                      or (node.op == "call_method" and node.target == "t")):
        return node.args[0]
    return None


def _linear_site(gm: fx.GraphModule, node: fx.Node) -> ConvSite | None:
    """nn.Linear, F.linear on a parameter, or x @ W.T (x.matmul(W.t())) on one, as a site with 1x1 sampling."""
    reader = node  # the node that reads the weight
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) is not nn.Linear:
            return None
        weight_name, bias_name, w, projection = (f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None
                                                 else None, m.weight, None)
        name = node.target
    else:
        args = {"bias": None, **dict(zip(("input", "weight", "bias"), node.args)), **node.kwargs}
        weight = args["weight"]
        if node.target in _MATMULS:
            reader, weight = weight, _transposed(weight)
        operands = _parameter_operands(gm, weight, args["bias"])
        if operands is None:
            return None
        w, weight_name, bias_name, projection = operands
        name = _layer_name(weight_name)
    if w.dim() != 2:
        return None
    x = node.args[0] if node.args else node.kwargs["input"]
    return ConvSite(node, name, weight_name, bias_name, _linear_geometry(w, x), projection, weight_reader=reader)


def conv_sites(gm: fx.GraphModule) -> list[ConvSite]:
    """Every conv and Linear site, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        site = None
        if node.op == "call_module":
            site = _module_site(gm, node) or _linear_site(gm, node)
        elif node.op == "call_function" and node.target in _CONV_FUNCTIONS:
            site = _function_site(gm, node)
        elif node.op == "call_function" and node.target in _LINEAR_FUNCTIONS + _MATMULS:
            site = _linear_site(gm, node)
        if site is not None:
            sites.append(site)
    return sites


def weight_groups(gm: fx.GraphModule, sites: list[ConvSite]) -> dict[int, list[ConvSite]]:
    """Sites grouped by the weight they use (a conv applied twice, or convs with tied weights), in graph order."""
    groups: dict[int, list[ConvSite]] = {}
    for site in sites:
        groups.setdefault(id(site.weight(gm)), []).append(site)
    return groups


def tied_elsewhere(gm: fx.GraphModule, sites: list[ConvSite]) -> list[str]:
    """The other names of these sites' weight that no site reads (an embedding tied to an output layer):
    a lowering would leave them holding the dense weight, so the model would store both."""
    weight, names = sites[0].weight(gm), {s.weight_name for s in conv_sites(gm)}
    return [n for n, p in gm.named_parameters(remove_duplicate=False) if p is weight and n not in names]


def samples_alike(gm: fx.GraphModule, sites: list[ConvSite]) -> bool:
    """Whether these convs sample their input alike and add the same bias, so that one lowered module can
    serve them all."""
    first = sites[0]
    call = lambda s: (s.geometry.conv_args(), s.geometry.groups)  # noqa: E731
    return all(call(s) == call(first)
               and (s.bias(gm) is None) == (first.bias(gm) is None)
               and (s.bias(gm) is None or s.bias(gm) is first.bias(gm)) for s in sites)


def insert_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put `module` at `path`, replacing whatever was there."""
    parent, _, attr = path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if hasattr(owner, attr) and attr not in owner._modules:
        delattr(owner, attr)
    owner.add_module(attr, module)


def finalize_projection(gm: fx.GraphModule, site: ConvSite) -> None:
    """Before lowering a DeepTwist-trained layer: make its kernel exactly low-rank (idempotent)."""
    if site.projection is None:
        return
    weight = site.weight(gm)
    if not site.projection.finalized:
        site.projection.finalize_(weight)
    elif not site.projection.holds(weight):  # changed since its final projection
        site.projection.project_(weight)


def replace_with_module(gm: fx.GraphModule, site: ConvSite, path: str, module: nn.Module) -> None:
    """Replace the conv node by one call_module node for `module`, put at `path`."""
    with gm.graph.inserting_before(site.node):
        node = gm.graph.create_node("call_module", path, (site.input,))
    _swap(gm, site, node, path, module)


def replace_with_chain(gm: fx.GraphModule, site: ConvSite, path: str, module: nn.Module) -> None:
    """Replace the conv node by call_module nodes for `module`'s children in order, and put `module`
    at `path`; attribute reads and projections that fed only the conv go too."""
    graph = gm.graph
    with graph.inserting_before(site.node):
        value = site.input
        for child in module._modules:  # create_node: the targets exist only once `module` is in place
            value = graph.create_node("call_module", f"{path}.{child}", (value,))
    _swap(gm, site, value, path, module)


def reuse_lowered(gm: fx.GraphModule, site: ConvSite, path: str) -> None:
    """Replace another use of an already lowered weight by a call of the lowered module at `path`."""
    with gm.graph.inserting_before(site.node):
        node = gm.graph.create_node("call_module", path, (site.input,))
    _swap(gm, site, node, path, None)


def _swap(gm: fx.GraphModule, site: ConvSite, value: fx.Node, path: str, module: nn.Module | None) -> None:
    value.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(value)
    inputs = [n for n in site.node.all_input_nodes if n is not site.input]
    gm.graph.erase_node(site.node)
    erase_if_dead(gm, inputs)
    if module is not None:
        insert_module(gm, path, module)
    site.lowered_to = path


def erase_if_dead(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase attribute reads and projections left without users, following their inputs upwards."""
    pending, erased = list(nodes), set()
    while pending:
        node = pending.pop()
        if node in erased or node.users:
            continue
        if node.op == "get_attr" or _transposed(node) is not None or (
                node.op == "call_module" and _is_projection(gm, node)):
            pending.extend(node.all_input_nodes)
            gm.graph.erase_node(node)
            erased.add(node)


def _is_projection(gm: fx.GraphModule, node: fx.Node) -> bool:
    try:
        return isinstance(gm.get_submodule(node.target), LowRankProjection)
    except AttributeError:  # it lived in a conv that a lowering replaced: a projection of a shared weight
        return True


def lowered_path(gm: fx.GraphModule, site: ConvSite, form: str) -> str:
    """Where the lowered module goes: in place of an nn.Conv2d that owned the weight, else beside it."""
    if site.weight_name == f"{site.name}.weight":
        try:
            if isinstance(gm.get_submodule(site.name), (nn.Conv2d, nn.Conv1d, nn.Linear)):
                return site.name
        except AttributeError:
            pass
    return f"{site.name}_{form}"


def _parametric(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the node computes with learned parameters (a layer), not only reshapes or mixes values."""
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(node.target).parameters())
    if node.op == "call_function" and node.target in (*_CONV_FUNCTIONS, *_LINEAR_FUNCTIONS, *_MATMULS):
        return True
    return any(n.op == "get_attr" and isinstance(_attr(gm, n.target), nn.Parameter) for n in node.all_input_nodes)


def _attr(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


def _reaches(gm: fx.GraphModule, start: list[fx.Node], onward, goal: str) -> bool:
    """Whether a walk from `start` along `onward(node)` reaches a node of op `goal` through nodes that
    compute without parameters."""
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        if node.op == goal:
            return True
        if node in seen or _parametric(gm, node):
            continue
        seen.add(node)
        todo.extend(onward(node))
    return False


def feeds_output(gm: fx.GraphModule, site: ConvSite) -> bool:
    """Whether the layer's output reaches the model's output through operations without parameters only
    (a flatten, a pooling, a softmax): the layer is the model's head."""
    return _reaches(gm, list(site.node.users), lambda n: n.users, "output")


def reads_input(gm: fx.GraphModule, site: ConvSite) -> bool:
    """Whether the layer reads the model's input through operations without parameters only: the stem."""
    start = [site.input] if isinstance(site.input, fx.Node) else []
    return _reaches(gm, start, lambda n: n.all_input_nodes, "placeholder")
