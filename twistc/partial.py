"""Partial evaluation: a traced model's output after one weight changes, rerunning only the nodes that
depend on that weight and reusing the unchanged model's values for the rest (its inputs, skip branches,
and every layer before it)."""
from __future__ import annotations

import torch
import torch.fx as fx


def readers(gm: fx.GraphModule, weight_name: str) -> list[fx.Node]:
    """The nodes that read the parameter `weight_name` under any of its names (a tied weight has several):
    get_attr nodes of it, and calls of a module that holds it."""
    weight = gm.get_parameter(weight_name)
    names = [name for name, p in gm.named_parameters(remove_duplicate=False) if p is weight]
    return [n for n in gm.graph.nodes if (n.op == "get_attr" and n.target in names)
            or (n.op == "call_module" and any(name.startswith(f"{n.target}.") for name in names))]


class Suffix:
    """Runs the part of `gm` that depends on one weight. `inputs(x)` computes, with the model as it is, the
    values that part reads from the rest; `__call__(x, inputs)` runs only that part and returns the model's
    output, so that after changing the weight in place it costs only the layers from it to the output."""

    def __init__(self, gm: fx.GraphModule, weight_name: str):
        self.gm = gm
        self.rerun = _closure(readers(gm, weight_name), lambda n: n.users)  # what depends on the weight
        if not self._values_are_kept():
            self.rerun = set(gm.graph.nodes)
        self.frontier = [n for n in gm.graph.nodes if n not in self.rerun and any(u in self.rerun for u in n.users)]
        prefix = _closure(self.frontier, lambda n: n.all_input_nodes)  # what computing the frontier takes
        rest = [n for n in gm.graph.nodes if n.op != "output"]
        # placeholders for values never read: fx's Interpreter skips the nodes already in its environment
        self._skip_prefix = {n: None for n in rest if n not in prefix}
        self._skip_suffix = {n: None for n in rest if n not in self.rerun}

    def _values_are_kept(self) -> bool:
        """Whether every value the rerun reads stays as the unchanged model left it. An op that changes its
        input in place breaks that where the input has other readers (the graph then relies on aliasing), or
        lies outside the rerun (the next rerun would read it changed); the whole model then reruns."""
        for node in self.gm.graph.nodes:
            changed = _changed_in_place(self.gm, node)
            if changed is not None and (len(changed.users) > 1 or (node in self.rerun) != (changed in self.rerun)):
                return False
        return True

    @torch.no_grad()
    def inputs(self, x: torch.Tensor) -> dict[fx.Node, object]:
        interpreter = fx.Interpreter(self.gm, garbage_collect_values=False)
        interpreter.run(x, initial_env=dict(self._skip_prefix))
        return {n: interpreter.env[n] for n in self.frontier}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, inputs: dict[fx.Node, object]):
        return fx.Interpreter(self.gm).run(x, initial_env={**self._skip_suffix, **inputs})


_IN_PLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior",
                       "ixor", "ilshift", "irshift"}


def _changed_in_place(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The node whose tensor `node` changes in place, if it does: x.add_(y), torch.relu_(x), F.relu(x,
    inplace=True), nn.ReLU(inplace=True), x += y."""
    if node.op == "call_module":
        in_place = getattr(gm.get_submodule(node.target), "inplace", False) is True
    elif node.op in ("call_method", "call_function"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        in_place = (node.kwargs.get("inplace") is True or (name.endswith("_") and not name.endswith("__"))
                    or name in _IN_PLACE_OPERATORS)
    else:
        return None
    first = node.args[0] if node.args else None
    return first if in_place and isinstance(first, fx.Node) else None


def _closure(start: list[fx.Node], step) -> set[fx.Node]:
    """`start` and every node reached from it by `step` (a node's users, or its inputs)."""
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(step(node))
    return seen
