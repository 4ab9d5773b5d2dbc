"""CP decomposition of a conv kernel (Lebedev et al., 2015, arXiv 1412.6553).

    W[T,S,kh,kw] ~= sum_r U_T[t,r] U_S[s,r] U_h[i,r] U_w[j,r]

lowered to 1x1 (S->R), a depthwise kh x 1 conv, a depthwise 1 x kw conv and 1x1 (R->T): four thin
convs whose weights are the four factors. The fit is tensorly's `parafac` (ALS from an SVD start) in
float64. CP's fit can be poor at low rank (ALS finds a local optimum), so the lowering records its
relative error and warns when it removes more than half of the kernel's norm.

Form `cp-chain`:
    conv(x, W) + b  ->  conv1x1(dw_1xkw(dw_khx1(conv1x1(x, U_S^T), U_h), U_w), U_T) + b
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from twistc.decomp.base import DEFAULT_RATIO, Decomposition, Form, copy_into
from twistc.decomp.cost import ConvGeometry, Cost, conv_cost, pair
from twistc.errors import RankError, SpecError

Tensor = torch.Tensor


@dataclass(frozen=True)
class CpFactors:
    out: Tensor     # [T, R], the factor weights folded in
    inp: Tensor     # [S, R]
    rows: Tensor    # [kh, R]
    cols: Tensor    # [kw, R]

    @property
    def rank(self) -> int:
        return self.out.shape[1]

    def reconstruct(self) -> Tensor:
        return torch.einsum("tr,sr,ir,jr->tsij", self.out, self.inp, self.rows, self.cols)


def cp(weight: Tensor, rank: int, n_iter: int = 200, tol: float = 1e-10) -> CpFactors:
    """Rank-`rank` CP factors of a 4-way kernel, in the kernel's dtype."""
    import tensorly as tl  # here, not at the top: its import takes a third of a second, which only CP needs
    from tensorly.decomposition import parafac

    w = weight.detach().double()
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tensorly notes a rank above a mode's size: expected here
        weights, (out, inp, rows, cols) = parafac(w, rank, n_iter_max=n_iter, init="svd", tol=tol,
                                                  random_state=0)
    dtype = weight.dtype
    return CpFactors((out * weights).to(dtype), inp.to(dtype), rows.to(dtype), cols.to(dtype))


def cp_max_rank(g: ConvGeometry) -> int:
    """An upper bound of a kernel's CP rank: the product of its modes but the largest."""
    dims = sorted((g.out_channels, g.in_channels, *g.kernel))
    return dims[0] * dims[1] * dims[2]


def cp_cost(g: ConvGeometry, rank: int) -> Cost:
    """1x1 at input resolution, kh x 1 at (out rows x in cols), 1 x kw and 1x1 at output resolution."""
    (kh, kw), (hi, wi), (ho, wo) = g.kernel, g.in_hw, g.out_hw
    macs = rank * (g.in_channels * hi * wi + kh * ho * wi + kw * ho * wo + g.out_channels * ho * wo)
    return Cost(rank * (g.in_channels + kh + kw + g.out_channels), macs)


class CpConv(nn.Sequential):
    """The CP chain: 1x1 (S->R), depthwise kh x 1 and 1 x kw (each R channels), 1x1 (R->T, with the bias).

    The depthwise convs split the original sampling by axis: the kh x 1 conv takes the row stride,
    padding and dilation, the 1 x kw conv the column ones. Padding columns commutes with a conv along
    the rows, so this equals the 2-D padding in every padding mode.
    """

    def __init__(self, conv_args: dict, out: Tensor, inp: Tensor, rows: Tensor, cols: Tensor, bias: Tensor | None):
        (t, r), s, kh, kw = out.shape, inp.shape[0], rows.shape[0], cols.shape[0]
        like = {"dtype": out.dtype, "device": out.device}
        stride, padding, dilation = (pair(conv_args[k]) for k in ("stride", "padding", "dilation"))
        mode = conv_args.get("padding_mode", "zeros")
        pad_rows, pad_cols = (padding, padding) if padding == "same" else ((padding[0], 0), (0, padding[1]))
        super().__init__()
        self.add_module("reduce", nn.Conv2d(s, r, 1, bias=False, **like))
        self.add_module("rows", nn.Conv2d(r, r, (kh, 1), stride=(stride[0], 1), padding=pad_rows,
                                          dilation=(dilation[0], 1), groups=r, bias=False, padding_mode=mode, **like))
        self.add_module("cols", nn.Conv2d(r, r, (1, kw), stride=(1, stride[1]), padding=pad_cols,
                                          dilation=(1, dilation[1]), groups=r, bias=False, padding_mode=mode, **like))
        self.add_module("expand", nn.Conv2d(r, t, 1, bias=bias is not None, **like))
        copy_into(self.reduce.weight, inp.T[:, :, None, None])
        copy_into(self.rows.weight, rows.T[:, None, :, None])
        copy_into(self.cols.weight, cols.T[:, None, None, :])
        copy_into(self.expand.weight, out[:, :, None, None])
        if bias is not None:
            copy_into(self.expand.bias, bias)


def _cp_chain(g, f: CpFactors, bias, method=None):
    return CpConv(g.conv_args(), f.out, f.inp, f.rows, f.cols, bias), None


class Cp(Decomposition):
    name = "cp"
    summary = ("CP (Lebedev et al. 2015), lowered to 1x1 (S->R) -> depthwise kh x 1 -> depthwise 1 x kw -> "
               "1x1 (R->T)")
    forms = (Form("cp-chain", ("Conv2d",), _cp_chain, "1x1 -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1 convs"),)
    poor_fit = 0.5  # ALS at low rank can stop far from the kernel

    def skip_reason(self, g):
        if g.taps == 1 and g.kind == "Conv2d":
            return "1x1 conv: its CP is an SVD pair with two extra scalings; use svd"
        return super().skip_reason(g)

    def choose_ranks(self, weight, g, request, layout):
        if request.ranks is not None:
            return self.check_ranks(g, request), {}
        if request.energy is not None or request.vbmf is not None:
            raise SpecError("energy= and rank=vbmf do not choose CP ranks (CP has no ordered spectrum); give "
                            "ratio or ranks")
        ratio = request.ratio if request.ratio is not None else DEFAULT_RATIO
        rank = int(conv_cost(g).params / (ratio * cp_cost(g, 1).params))
        if rank < 1:
            raise RankError(f"ratio {ratio:g} is out of reach: CP rank 1 compresses this conv only "
                            f"{conv_cost(g).params / cp_cost(g, 1).params:.2f}x")
        return (max(min(rank, cp_max_rank(g)), request.matrix_floor(cp_max_rank(g))),), {"ratio": ratio}

    def check_ranks(self, g, entry):
        ranks, top = tuple(entry.ranks), cp_max_rank(g)
        if len(ranks) != 1 or not 1 <= ranks[0] <= top:
            raise RankError(f"CP rank {'x'.join(map(str, ranks))} is outside 1..{top} for this kernel")
        return ranks

    def fit(self, weight, entry, stats=None):
        return cp(weight, entry.ranks[0])

    def cost(self, g, entry):
        return cp_cost(g, entry.ranks[0])

    def random_factors(self, g, entry, rand):
        r, (kh, kw) = entry.ranks[0], g.kernel
        return CpFactors(rand(g.out_channels, r), rand(g.in_channels, r), rand(kh, r), rand(kw, r))

    def rank_grid(self, g, steps, rounded):
        top = min(cp_max_rank(g), conv_cost(g).params // cp_cost(g, 1).params)  # as many weights as the conv
        return [(rounded(top * k / steps, top),) for k in range(1, steps)] if top >= 1 else []

    def errors(self, weight, entries, stats=None):
        """The ALS fit's error at each rank, with fewer iterations than the lowering's (an estimate)."""
        norm = torch.linalg.vector_norm(weight)
        return [float(torch.linalg.vector_norm(weight - cp(weight, e.ranks[0], n_iter=50, tol=1e-6).reconstruct())
                      / norm) for e in entries]
