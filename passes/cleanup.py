"""cleanup: remove what no output depends on, without changing any output.

- finished DeepTwist projections (their final projection ran, so they are identities),
- dead nodes,
- submodules, parameters and buffers that no node reaches any more.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from twistc.projection import LowRankProjection
from twistc.pipeline import Pass, PassResult, register


@register
@dataclass(frozen=True)
class Cleanup(Pass):
    name = "cleanup"
    summary = "drop finished projections, dead nodes, and unused submodules and parameters"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        removed = _drop_finished_projections(gm)
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        removed += before - len(gm.graph.nodes)
        removed += _drop_unused(gm)
        return PassResult(gm, removed > 0, removed)


def _drop_finished_projections(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, LowRankProjection) and module.finalized:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                count += 1
    return count


def _drop_unused(gm: fx.GraphModule) -> int:
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    return _sweep(gm, "", called, read)


def _sweep(module: nn.Module, prefix: str, called: set[str], read: set[str]) -> int:
    """Remove from `module` (at path `prefix`) everything no call_module or get_attr reaches."""
    if prefix in called:
        return 0
    count = 0
    for kind in ("_parameters", "_buffers"):
        for attr in list(getattr(module, kind)):
            if _join(prefix, attr) not in read:
                delattr(module, attr)
                count += 1
    for attr, child in list(module._modules.items()):
        path = _join(prefix, attr)
        if child is None or not _reached(path, called, read):
            delattr(module, attr)
            count += 1
        else:
            count += _sweep(child, path, called, read)
    return count


def _reached(path: str, called: set[str], read: set[str]) -> bool:
    return any(t == path or t.startswith(path + ".") for t in called | read)


def _join(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr
