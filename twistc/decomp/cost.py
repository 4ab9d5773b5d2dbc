"""A layer's geometry (one type for every layer kind), and the cost model of a conv and of its lowered forms:
weight parameters and MACs per sample.

Parameters count weights only (no bias), which is how compression ratios are defined throughout.
MACs are multiply-accumulates for one input sample; FLOPs, where reported, are 2 x MACs.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvGeometry:
    """What a layer's call is: its shape and sampling. A Conv1d is held as the Conv2d with kernel (k, 1) over
    (length, 1) pixels, a Linear layer as a 1x1 conv over (tokens, 1)."""

    out_channels: int
    in_channels: int
    kernel: tuple[int, int]
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    kind: str = "Conv2d"  # or "Conv1d" (kernel (k, 1) over (length, 1)), "Linear" (1x1 over (tokens, 1))
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def one_d(self) -> bool:
        return self.kind == "Conv1d"

    @property
    def spatial_kernel(self) -> tuple[int, ...]:
        """The kernel's own shape: (kh, kw), or (k,) for a Conv1d."""
        return self.kernel[:1] if self.one_d else self.kernel

    def conv_args(self) -> dict:
        """Keyword arguments of nn.Conv2d (nn.Conv1d for a Conv1d) that reproduce the layer's sampling."""
        if self.one_d:
            padding = self.padding if isinstance(self.padding, str) else self.padding[:1]
            return {"stride": self.stride[:1], "padding": padding, "dilation": self.dilation[:1],
                    "padding_mode": self.padding_mode}
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "padding_mode": self.padding_mode}


def pair(v) -> tuple[int, int] | str:
    """A conv's stride, padding or dilation as a pair (a padding string as it is)."""
    return v if isinstance(v, str) else ((v, v) if isinstance(v, int) else tuple(v))


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.macs + other.macs)


def _pixels(hw: tuple[int, int]) -> int:
    return hw[0] * hw[1]


def conv_cost(g: ConvGeometry) -> Cost:
    params = g.out_channels * (g.in_channels // g.groups) * g.taps
    return Cost(params, params * _pixels(g.out_hw))


def tucker_chain_cost(g: ConvGeometry, ranks: tuple[int, int]) -> Cost:
    """1x1 (S->r_in) at input resolution, kh x kw (r_in->r_out), 1x1 (r_out->T) at output resolution."""
    r_out, r_in = ranks
    reduce = g.in_channels * r_in
    core = r_in * r_out * g.taps
    expand = r_out * g.out_channels
    macs = reduce * _pixels(g.in_hw) + (core + expand) * _pixels(g.out_hw)
    return Cost(reduce + core + expand, macs)


def lowrank_cost(g: ConvGeometry, factor_params: int) -> Cost:
    """A 2-D low-rank form (SVD or tiled SVD of the lowered matrix): every factor entry is one MAC per
    output pixel, whether it runs as a conv pair or as im2col + GEMMs."""
    return Cost(factor_params, factor_params * _pixels(g.out_hw))
