"""Counting what a model or a lowered layer stores: the numbers behind every ratio twistc reports."""
from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module) -> int:
    """The numbers a model stores for inference: parameters and floating-point buffers (BatchNorm
    statistics, one-hot im2col kernels). For a model whose BatchNorms are folded this is the element
    count of its ONNX file's initializers."""
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point())


def count_weights(module: nn.Module) -> int:
    """The numbers a lowered layer stores besides its bias: weights and constants (one-hot kernels, the
    zero padding of ragged tiles), as a layer's compression ratio counts them."""
    return sum(t.numel() for name, t in (*module.named_parameters(), *module.named_buffers())
               if t.is_floating_point() and name.rpartition(".")[2] != "bias")
