"""Exact algebra on inference-time layers: BatchNorm folded into a conv or Linear layer, two convs
merged into one.

    BN(conv(x)) = conv'(x)        W' = W * s,  b' = (b - mean) * s + beta,  s = gamma / sqrt(var + eps)
                                  (for the lowered GEMM forms, W is the stacked U blocks)
    conv2(conv1(x)) = conv'(x)    when conv1 is a plain 1x1 (mixing channels pixel by pixel) or conv2 is

A 1x1 first conv commutes with the second's sampling (stride, dilation, padding) as long as padding
cannot see its bias: padded zeros would not carry it. Only ungrouped convs with zero padding are merged.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from twistc.decomp.im2col import LowRankGemm


def foldable_batchnorm(layer: nn.Module, bn: nn.Module, out_dims: int) -> bool:
    """Whether `bn`, normalising with running statistics (an affine map per channel in eval mode), can
    fold into `layer` before it, whose output has `out_dims` dimensions: BatchNorm2d after a Conv2d or
    a lowered GEMM form, BatchNorm1d after a Conv1d, or after a Linear layer with (batch, features)
    output."""
    if not (isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and bn.track_running_stats
            and bn.running_var is not None):
        return False
    if isinstance(layer, (nn.Conv2d, LowRankGemm)):
        return isinstance(bn, nn.BatchNorm2d)
    return isinstance(bn, nn.BatchNorm1d) and (isinstance(layer, nn.Conv1d)
                                               or (isinstance(layer, nn.Linear) and out_dims == 2))


def _affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN in eval mode as y = x * scale + shift per channel (float64)."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


@torch.no_grad()
def fold_batchnorm(layer: nn.Module, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> nn.Module:
    """A conv, Linear layer or lowered GEMM form followed by bn (eval), as one layer of the same kind with
    a bias; the caller checked `foldable_batchnorm`."""
    scale, shift = _affine(bn)
    folded = copy.deepcopy(layer)
    if isinstance(layer, LowRankGemm):  # output channel o is row o of the stacked U blocks
        weight = folded.u_blocks.view(-1, folded.u_blocks.shape[-1])[: folded.out_channels]
    else:  # output channel o is weight[o]
        weight = folded.weight
    bias = layer.bias.double() * scale + shift if layer.bias is not None else shift
    weight.copy_(weight.double() * scale.view(-1, *([1] * (weight.dim() - 1))))
    folded.bias = nn.Parameter(bias.to(weight.dtype))
    return folded


def _plain_1x1(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding in ((0, 0), "valid", "same"))


def mergeable(first: nn.Conv2d, second: nn.Conv2d) -> bool:
    """Whether second(first(x)) is exactly one conv."""
    if first.groups != 1 or second.groups != 1 or first.padding_mode != "zeros" or second.padding_mode != "zeros":
        return False
    if _plain_1x1(first):
        return first.bias is None or second.padding in ((0, 0), "valid")
    return _plain_1x1(second)


def merged_macs_per_pixel(first: nn.Conv2d, second: nn.Conv2d, pixels_ratio: float) -> tuple[float, float]:
    """MACs per output pixel of the pair and of the merged conv; `pixels_ratio` is first's output
    pixels over second's (the stride of second, squared, where it downsamples)."""
    pair = first.weight.numel() * pixels_ratio + second.weight.numel()
    taps = max(first.kernel_size[0] * first.kernel_size[1], second.kernel_size[0] * second.kernel_size[1])
    return pair, first.in_channels * second.out_channels * taps


@torch.no_grad()
def merge_convs(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """second(first(x)) as one conv; the caller checked `mergeable`."""
    w1, w2 = first.weight.double(), second.weight.double()
    b1 = first.bias.double() if first.bias is not None else None
    b2 = second.bias.double() if second.bias is not None else None
    if _plain_1x1(first):  # first mixes input channels: fold it into second's input side
        outer, weight = second, torch.einsum("trhw,rs->tshw", w2, w1[:, :, 0, 0])
        bias = b2 if b1 is None else (b2 if b2 is not None else 0) + torch.einsum("trhw,r->t", w2, b1)
    else:  # second mixes output channels: fold it into first's output side
        outer, weight = first, torch.einsum("tr,rshw->tshw", w2[:, :, 0, 0], w1)
        bias = None if b1 is None else w2[:, :, 0, 0] @ b1
        bias = b2 if bias is None else (bias if b2 is None else bias + b2)
    merged = _like(outer, first.in_channels, second.out_channels, weight.shape[2:], bias=bias is not None)
    merged.weight.copy_(weight)
    if bias is not None:
        merged.bias.copy_(bias)
    return merged


def _like(conv: nn.Conv2d, in_channels: int, out_channels: int, kernel, bias: bool) -> nn.Conv2d:
    """A conv with `conv`'s sampling, dtype and device and the given channels, kernel and bias."""
    return nn.Conv2d(in_channels, out_channels, tuple(kernel), stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=conv.groups, bias=bias, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)
