"""Modules that passes insert: the DeepTwist weight projection and the lowered conv forms."""
from __future__ import annotations

import torch
from torch import nn

from twistc.decomp.tucker import tucker2
from twistc.errors import NonFiniteError


class LowRankProjection(nn.Module):
    """DeepTwist's weight distortion, placed between a conv's weight and the conv.

    It is the single source of truth for the layer's decomposition and ranks. Each training-mode
    forward with grad enabled is one step; at every multiple of `period` the weight is replaced
    in place by its low-rank reconstruction. Otherwise (eval mode, no_grad, export) it is the
    identity. `step`, `distortions` and `final_projections` are buffers, so they checkpoint.
    """

    def __init__(self, layer: str, weight_name: str, decomp: str, ranks: tuple[int, ...], period: int):
        super().__init__()
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.layer = layer
        self.weight_name = weight_name
        self.decomp = decomp
        self.ranks = tuple(int(r) for r in ranks)
        self.period = int(period)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("distortions", torch.zeros((), dtype=torch.int64))
        self.register_buffer("final_projections", torch.zeros((), dtype=torch.int64))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.step += 1
            if int(self.step) % self.period == 0:
                self.project_(weight)
                self.distortions += 1
        return weight

    def reconstruct(self, weight: torch.Tensor) -> torch.Tensor:
        if self.decomp == "tucker":
            return tucker2(weight, self.ranks).reconstruct()
        raise ValueError(f"unknown decomposition {self.decomp!r}")

    @torch.no_grad()
    def project_(self, weight: torch.Tensor) -> None:
        """Replace `weight` in place by its low-rank reconstruction."""
        if not torch.isfinite(weight).all():
            raise NonFiniteError(
                f"layer {self.layer}: weight is not finite at step {int(self.step)}; "
                "lower the learning rate or raise the ranks"
            )
        weight.copy_(self.reconstruct(weight))

    def finalize_(self, weight: torch.Tensor) -> None:
        """The final projection: afterwards the kernel is exactly low-rank."""
        self.project_(weight)
        self.final_projections += 1

    @property
    def finalized(self) -> bool:
        return int(self.final_projections) > 0

    def extra_repr(self) -> str:
        return f"layer={self.layer}, decomp={self.decomp}, ranks={self.ranks}, period={self.period}"


class TuckerConv(nn.Sequential):
    """The Tucker-2 chain: 1x1 (S->r_in), kh x kw (r_in->r_out), 1x1 (r_out->T, with the bias).

    The reducing 1x1 runs before padding and stride; it commutes with every padding mode because
    it mixes channels pixel by pixel and padding copies or zeroes pixels channel by channel.
    """

    def __init__(self, conv_args: dict, u_out: torch.Tensor, core: torch.Tensor, u_in: torch.Tensor,
                 bias: torch.Tensor | None):
        r_out, r_in, kh, kw = core.shape
        reduce = nn.Conv2d(u_in.shape[0], r_in, 1, bias=False)
        core_conv = nn.Conv2d(r_in, r_out, (kh, kw), bias=False, **conv_args)
        expand = nn.Conv2d(r_out, u_out.shape[0], 1, bias=bias is not None)
        with torch.no_grad():
            reduce.weight.copy_(u_in.T[:, :, None, None])
            core_conv.weight.copy_(core)
            expand.weight.copy_(u_out[:, :, None, None])
            if bias is not None:
                expand.bias.copy_(bias)
        super().__init__()
        self.add_module("reduce", reduce)
        self.add_module("core", core_conv)
        self.add_module("expand", expand)
