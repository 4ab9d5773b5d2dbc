"""Tucker-2 of a conv kernel over its output- and input-channel modes, and its lowered form.

    W[T,S,kh,kw] ~= G[r_out,r_in,kh,kw] x_0 U_out[T,r_out] x_1 U_in[S,r_in]

HOSVD takes each factor as the leading left singular vectors of the mode's unfolding. They are
computed as eigenvectors of the unfolding's Gram matrix (T x T or S x S), which is far cheaper than
an SVD of the wide unfolding (tools/bench_tucker.py measures both against tensorly's
partial_tucker). HOOI then alternates: each factor is re-fitted with the other fixed, which never
increases the error. A float64 kernel is decomposed in float64, any other in float32 (the products
and eigendecompositions take about half as long, and the factors come back in the weight's dtype,
which keeps no more than float32 does); the errors that decide when HOOI stops are summed in float64.

Form `tucker-chain` (Kim et al. 2016):
    conv(x, W) + b  ->  conv1x1(conv_khxkw(conv1x1(x, U_in^T), G), U_out) + b
The core keeps the original stride, padding (mode included) and dilation; the bias moves to the last 1x1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from twistc.decomp.base import DEFAULT_RATIO, Decomposition, Form, conv_class, copy_into, pointwise
from twistc.decomp.cost import tucker_chain_cost
from twistc.decomp.modes import mode_dot, unfold
from twistc.decomp.svd import lowered
from twistc.decomp.whiten import output_error, tucker2_whitened
from twistc.decomp.rank import (check_tucker_ranks, rank_for_energy, tucker_max_ranks, tucker_ranks_for_ratio,
                                vbmf_weakened)

Tensor = torch.Tensor


@dataclass(frozen=True)
class Tucker2:
    core: Tensor   # [r_out, r_in, kh, kw]
    u_out: Tensor  # [T, r_out]
    u_in: Tensor   # [S, r_in]

    @property
    def ranks(self) -> tuple[int, int]:
        return self.u_out.shape[1], self.u_in.shape[1]

    def reconstruct(self) -> Tensor:
        return mode_dot(mode_dot(self.core, self.u_out, 0), self.u_in, 1)


def leading_subspace(unfolding: Tensor, rank: int) -> Tensor:
    """Orthonormal basis [rows, rank] of the leading left singular subspace, via the Gram matrix."""
    return _leading(unfolding, rank)[0]


def _leading(unfolding: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The leading subspace and the squared norm the unfolding keeps when projected on it (the sum of
    the Gram matrix's `rank` largest eigenvalues)."""
    values, vectors = torch.linalg.eigh(unfolding @ unfolding.T)  # ascending eigenvalues
    return vectors[:, -rank:].flip(1), values[-rank:].clamp_min(0).double().sum()


def _working(weight: Tensor) -> Tensor:
    """The kernel in the precision its decomposition runs in: float64 stays, all else is float32."""
    return weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)


def mode_energies(weight: Tensor, mode: int) -> Tensor:
    """Squared singular values of the mode-`mode` unfolding, descending."""
    unfolding = unfold(weight.detach().double(), mode)
    return torch.linalg.eigvalsh(unfolding @ unfolding.T).flip(0).clamp_min(0)


def _project_core(w: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    return mode_dot(mode_dot(w, u_out.T, 0), u_in.T, 1)


def hosvd(weight: Tensor, ranks: tuple[int, int]) -> Tucker2:
    r_out, r_in = ranks
    w = _working(weight)
    u_out = leading_subspace(unfold(w, 0), r_out)
    u_in = leading_subspace(unfold(w, 1), r_in)
    return _cast(Tucker2(_project_core(w, u_out, u_in), u_out, u_in), weight.dtype)


def hooi(weight: Tensor, ranks: tuple[int, int], n_iter: int = 10, rtol: float = 1e-3) -> Tucker2:
    """HOOI from HOSVD's input factor: alternating refits of the output and input factors, each optimal
    with the other fixed, until an iteration improves the error by less than `rtol` of itself. Almost
    all of HOOI's gain comes in the first two or three refits; the later ones cost as much and change
    the error in its fourth digit.

    Each refit's eigenvalues give the error it leaves (||W||^2 - ||G||^2 for orthonormal factors), so
    the core is formed once, at the end."""
    r_out, r_in = ranks
    w = _working(weight)
    norm2 = w.double().square().sum()
    error = lambda kept: float((norm2 - kept).clamp_min(0).sqrt() / norm2.sqrt().clamp_min(1e-300))
    u_in = leading_subspace(unfold(w, 1), r_in)  # HOSVD's input factor
    reduced = mode_dot(w, u_in.T, 1)  # W x_1 U_in^T
    u_out, kept = _leading(unfold(reduced, 0), r_out)  # the best output factor for it
    before = error(kept)
    for _ in range(n_iter):
        u_in, _ = _leading(unfold(mode_dot(w, u_out.T, 0), 1), r_in)
        reduced = mode_dot(w, u_in.T, 1)
        u_out, kept = _leading(unfold(reduced, 0), r_out)
        after = error(kept)
        if before - after < rtol * before:
            break
        before = after
    return _cast(Tucker2(mode_dot(reduced, u_out.T, 0), u_out, u_in), weight.dtype)


def tucker2(weight: Tensor, ranks: tuple[int, int], n_iter: int = 10) -> Tucker2:
    """The Tucker-2 used by passes and projections: HOOI from HOSVD's input factor."""
    return hooi(weight, ranks, n_iter=n_iter)


def _cast(t: Tucker2, dtype: torch.dtype) -> Tucker2:
    return Tucker2(t.core.to(dtype), t.u_out.to(dtype), t.u_in.to(dtype))


def hosvd_errors(weight: Tensor, rank_pairs: list[tuple[int, int]]) -> list[float]:
    """||W - W_hosvd|| / ||W|| for each (r_out, r_in), from one eigendecomposition per channel mode.

    HOOI, which the lowering uses, reaches at most this error, so it is a cheap, safe estimate
    for comparing many candidate ranks."""
    w = weight.detach().double()
    norm = torch.linalg.vector_norm(w).clamp_min(1e-300)
    errors = []
    bases = [leading_subspace(unfold(w, mode), w.shape[mode]) for mode in (0, 1)]
    for r_out, r_in in rank_pairs:
        core = _project_core(w, bases[0][:, :r_out], bases[1][:, :r_in])  # orthonormal: kept norm = ||core||
        kept = torch.linalg.vector_norm(core) ** 2
        errors.append(float((norm ** 2 - kept).clamp_min(0).sqrt() / norm))
    return errors


def tucker_ranks_for_energy(weight: Tensor, energy: float) -> tuple[int, int]:
    """Smallest ranks keeping `energy` of each channel mode's squared singular values."""
    return tuple(rank_for_energy(mode_energies(weight, mode), energy) for mode in (0, 1))


class TuckerConv(nn.Sequential):
    """The Tucker-2 chain: 1x1 (S->r_in), kh x kw (r_in->r_out), 1x1 (r_out->T, with the bias).

    The reducing 1x1 runs before padding and stride; it commutes with every padding mode because
    it mixes channels pixel by pixel and padding copies or zeroes pixels channel by channel.
    """

    def __init__(self, conv_args: dict, u_out: Tensor, core: Tensor, u_in: Tensor, bias: Tensor | None):
        r_out, r_in, *kernel = core.shape
        like = {"dtype": core.dtype, "device": core.device}  # the model's own dtype and device
        conv = conv_class(len(kernel))
        super().__init__()
        self.add_module("reduce", conv(u_in.shape[0], r_in, 1, bias=False, **like))
        self.add_module("core", conv(r_in, r_out, tuple(kernel), bias=False, **conv_args, **like))
        self.add_module("expand", conv(r_out, u_out.shape[0], 1, bias=bias is not None, **like))
        copy_into(self.reduce.weight, pointwise(u_in.T, len(kernel)))
        copy_into(self.core.weight, core)
        copy_into(self.expand.weight, pointwise(u_out, len(kernel)))
        if bias is not None:
            copy_into(self.expand.bias, bias)


def _tucker_chain(g, f: Tucker2, bias, method=None):
    return TuckerConv(g.conv_args(), f.u_out, f.core, f.u_in, bias), None


class Tucker(Decomposition):
    name = "tucker"
    summary = ("Tucker-2 over the channel modes, lowered to 1x1 (S->r_in) -> kh x kw (r_in->r_out) -> 1x1 (r_out->T); "
               "for a Conv1d, the same chain of Conv1d layers")
    kinds = ("Conv2d", "Conv1d")
    forms = (Form("tucker-chain", kinds, _tucker_chain, "1x1 -> kh x kw -> 1x1 convs"),)

    def skip_reason(self, g):
        if g.taps == 1 and g.kind in self.kinds:
            return "1x1 conv: a Tucker chain of it is never smaller"
        return super().skip_reason(g)

    def choose_ranks(self, weight, g, request, layout):
        if request.ranks is not None:
            return check_tucker_ranks(g, tuple(request.ranks)), {}
        raised = lambda ranks: tuple(max(r, min(f, top)) for r, f, top in zip(ranks, request.floor,
                                                                             tucker_max_ranks(g)))
        if request.energy is not None:
            return raised(tucker_ranks_for_energy(weight, request.energy)), {"energy": request.energy}
        if request.vbmf is not None:  # each channel mode's unfolding
            return raised(tuple(vbmf_weakened(unfold(weight.detach().double(), mode), request.vbmf)
                                for mode in (0, 1))), {}
        ratio = request.ratio if request.ratio is not None else DEFAULT_RATIO
        return tucker_ranks_for_ratio(g, ratio, request.round_to, request.floor), {"ratio": ratio}

    def check_ranks(self, g, entry):
        return check_tucker_ranks(g, tuple(entry.ranks))

    data_aware = True

    def fit(self, weight, entry, stats=None):
        if entry.fit == "activation" and stats is not None:
            factors = tucker2_whitened(weight, stats, tuple(entry.ranks), tucker2)
            if factors is not None:
                return _cast(Tucker2(*factors), weight.dtype)
        return tucker2(weight, tuple(entry.ranks))

    def cost(self, g, entry):
        return tucker_chain_cost(g, tuple(entry.ranks))

    def random_factors(self, g, entry, rand):
        (r_out, r_in) = entry.ranks
        return Tucker2(rand(r_out, r_in, *g.spatial_kernel), rand(g.out_channels, r_out), rand(g.in_channels, r_in))

    def full_ranks(self, g, entry):
        return tucker_max_ranks(g)

    def rank_grid(self, g, steps, rounded):
        top_out, top_in = tucker_max_ranks(g)
        return [(rounded(top_out * k / steps, top_out), rounded(top_in * k / steps, top_in)) for k in range(1, steps)]

    def errors(self, weight, entries, stats=None):
        if stats is None or not any(e.fit == "activation" for e in entries):
            return hosvd_errors(weight, [tuple(e.ranks) for e in entries])
        k, cov = lowered(weight), stats.covariance
        return [output_error(k, lowered(self.fit(weight, e, stats).reconstruct()), cov) if e.fit == "activation"
                else hosvd_errors(weight, [tuple(e.ranks)])[0] for e in entries]
