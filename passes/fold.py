"""fold: fold each BatchNorm into the conv before it, and merge adjacent convs of a lowered chain.

    conv -> BatchNorm2d              ->  one conv with a bias (running statistics, as in eval mode)
    Conv1d or Linear -> BatchNorm1d  ->  likewise (a Linear layer's output must be (batch, features))
    lowered GEMM form -> BatchNorm2d ->  the same form, its U blocks scaled, with a bias
    1x1 -> kh x kw  or  kh x kw -> 1x1  ->  one kh x kw conv, where that costs no more MACs

Nothing non-linear lies between the convs of a lowered chain, so merging is exact. It pays where a
Tucker rank equals the channels it reduces (the reducing 1x1 is then a change of basis the core can
absorb) and wherever the merged kernel is cheaper than the pair. Only convs whose output feeds nothing
else, called once, and inside one lowered module are merged, so each layer's record stays its own.
The model is for inference afterwards: BatchNorm no longer learns statistics, so fold after `train`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from twistc.convs import insert_module
from twistc.errors import SpecError
from twistc.fold import fold_batchnorm, foldable_batchnorm, merge_convs, merged_macs_per_pixel, mergeable
from twistc.decomp.im2col import LowRankGemm
from twistc.pipeline import Pass, PassResult, register
from twistc.passes.lower import lowered_cost
from twistc.state import state_of
from twistc.trace import shape_prop


@register
@dataclass(frozen=True)
class Fold(Pass):
    name = "fold"
    summary = "fold BatchNorm into the conv before it; merge a lowered chain's adjacent convs where cheaper"
    option_help = {"batchnorm": "fold BatchNorm (running statistics) into the conv or Linear layer before it",
                   "merge": "merge adjacent convs of a lowered chain where the merged conv costs no more MACs"}

    batchnorm: bool = True
    merge: bool = True

    def check_order(self, before, after) -> None:
        if any(stage.name == "train" for stage in after):
            raise SpecError("fold freezes BatchNorm into the convs, so it goes after train; move it after train")

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule) -> PassResult:
        state = state_of(gm)
        shape_prop(gm, state.example_inputs)
        calls = _call_counts(gm)
        folds = 0
        for node in list(gm.graph.nodes):
            first = _single_input(gm, node, calls)
            if first is None:
                continue
            module = gm.get_submodule(node.target)
            if self.batchnorm and foldable_batchnorm(gm.get_submodule(first.target), module, _dims(first)):
                insert_module(gm, first.target, fold_batchnorm(gm.get_submodule(first.target), module))
                node.replace_all_uses_with(first)
                gm.graph.erase_node(node)
                folds += 1
            elif (self.merge and isinstance(module, nn.Conv2d) and isinstance(gm.get_submodule(first.target), nn.Conv2d)
                  and self._cheaper(gm, first, node)):
                insert_module(gm, node.target, merge_convs(gm.get_submodule(first.target), module))
                node.args = first.args
                gm.graph.erase_node(first)
                gm.delete_submodule(first.target)
                folds += 1
        if folds:
            _recount(gm)
        return PassResult(gm, folds > 0, folds)

    @staticmethod
    def _cheaper(gm: fx.GraphModule, first: fx.Node, second: fx.Node) -> bool:
        a, b = gm.get_submodule(first.target), gm.get_submodule(second.target)
        if first.target.rpartition(".")[0] != second.target.rpartition(".")[0] or not mergeable(a, b):
            return False
        ratio = _pixels(first) / _pixels(second)
        pair, merged = merged_macs_per_pixel(a, b, ratio)
        return merged <= pair


def _call_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _single_input(gm: fx.GraphModule, node: fx.Node, calls: dict[str, int]) -> fx.Node | None:
    """The call of a conv, Linear layer or lowered GEMM form (called nowhere else) that feeds `node` alone,
    when `node` is a module call."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
        return None
    first = node.args[0]
    if (isinstance(first, fx.Node) and first.op == "call_module" and calls[first.target] == 1
            and len(first.users) == 1
            and isinstance(gm.get_submodule(first.target), (nn.Conv2d, nn.Conv1d, nn.Linear, LowRankGemm))):
        return first
    return None


def _dims(node: fx.Node) -> int:
    return len(node.meta["tensor_meta"].shape)


def _pixels(node: fx.Node) -> int:
    return math.prod(node.meta["tensor_meta"].shape[2:])


def _recount(gm: fx.GraphModule) -> None:
    """Each lowered layer's cost from the convs its module now runs (folding and merging keep the output
    shapes of the nodes that remain, so their shape metadata still holds)."""
    for record in state_of(gm).layers.values():
        if not record.module or record.after is None:
            continue
        convs = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(record.module + ".")
                 and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
        if convs:
            macs = sum(gm.get_submodule(n.target).weight.numel() * _pixels(n) for n in convs)
            record.after = lowered_cost(gm, record, macs)
