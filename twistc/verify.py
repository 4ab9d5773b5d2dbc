"""Checks run before, between and after passes: the graph is well formed and computes the same shapes."""
from __future__ import annotations

import torch.fx as fx

from twistc.errors import PassError, first_line
from twistc.state import state_of
from twistc.trace import output_shapes, shape_prop


def _resolve(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.op == "call_module":
        gm.get_submodule(node.target)
    elif node.op == "get_attr":
        owner, _, attr = node.target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if not hasattr(module, attr):
            raise AttributeError(f"{node.target} does not exist")


def verify(gm: fx.GraphModule, where: str) -> None:
    """Lint, resolve every target, and re-propagate shapes in eval mode; raise PassError naming `where`."""
    state = state_of(gm)
    try:
        gm.graph.lint()
        for node in gm.graph.nodes:
            _resolve(gm, node)
        shapes = output_shapes(shape_prop(gm, state.example_inputs))
    except Exception as e:
        cause = e.__cause__ or e  # ShapeProp wraps the error of the node that failed
        first = first_line(cause)
        raise PassError(f"invalid graph after {where}: {type(cause).__name__}: {first}") from None
    if shapes != state.output_shapes:
        raise PassError(f"invalid graph after {where}: output shapes {shapes} != original {state.output_shapes}")
