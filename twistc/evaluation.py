"""Evaluation: a model's top-1 accuracy on the user's data, and the class scores in its output.

Used by the train loop, plan-latency (max_drop, objective=eval) and the CLI's accuracy figures.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
from torch import nn

from twistc.errors import ModelFileError


def accuracy(module: nn.Module, data: Iterable, prepare: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> float:
    """Top-1 accuracy (a fraction) in eval mode, of the inputs after `prepare` (device, memory order);
    training flags are restored."""
    correct, seen = correct_and_seen(module, data, prepare)
    return correct / max(seen, 1)


@torch.no_grad()
def correct_and_seen(module: nn.Module, data: Iterable,
                      prepare: Callable[[torch.Tensor], torch.Tensor]) -> tuple[int, int]:
    correct = seen = 0
    with in_mode(module, training=False):
        for x, y in data:
            try:
                out = module(prepare(x))
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ModelFileError(f"running the model on a batch of eval_data() failed: {type(e).__name__}: "
                                     f"{first}; eval_data() must yield (input, target) batches that the model "
                                     "takes, like example_inputs()") from None
            logits = class_scores(out)
            check_targets(y, logits.shape[1], "eval_data()")
            correct += int((logits.argmax(1).cpu() == y).sum())
            seen += len(y)
    return correct, seen


def check_targets(y: torch.Tensor, classes: int, where: str) -> None:
    """Refuse targets that are not class indices of a model with `classes` outputs."""
    if y.dim() == 1 and not y.is_floating_point() and y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ModelFileError(f"{where} gives targets {int(y.min())}..{int(y.max())}, but the model has {classes} "
                             f"outputs: targets must be class indices in [0, {classes})")


@contextmanager
def in_mode(module: nn.Module, training: bool):
    """The module in training or eval mode for the duration; each submodule's own flag restored after."""
    modes = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def class_scores(out, where: str = "eval_data()") -> torch.Tensor:
    """The class scores in a model's output: the tensor itself, a dict's 'logits', or a tuple's first tensor.
    `where`: the data the model ran on, named in the error when there are none."""
    if isinstance(out, dict) and torch.is_tensor(out.get("logits")):
        out = out["logits"]
    elif isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        out = out[0]
    if not torch.is_tensor(out) or out.dim() != 2:
        what = f"a tensor of shape {tuple(out.shape)}" if torch.is_tensor(out) else f"a {type(out).__name__}"
        raise ModelFileError(f"{where} needs the model to return class scores [batch, classes] (a tensor, a "
                             f"dict with 'logits', or a tuple whose first item they are); it returns {what}")
    return out
