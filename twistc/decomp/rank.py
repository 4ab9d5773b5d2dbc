"""Rank choosers for Tucker-2 (explicit ranks or a compression ratio) and for spectra (an energy threshold).

The ratio is counted on weight parameters only (dense kernel / Tucker chain). Ranks keep
r_out / T = r_in / S and are the largest such pair whose achieved ratio is still >= the request.
"""
from __future__ import annotations

import math

import torch

from twistc.decomp.cost import ConvGeometry, conv_cost, tucker_chain_cost
from twistc.errors import RankError


def tucker_max_ranks(g: ConvGeometry) -> tuple[int, int]:
    """Full multilinear rank bound: each mode's unfolding has at most min(rows, cols) rank."""
    t, s = g.out_channels, g.in_channels
    return min(t, s * g.taps), min(s, t * g.taps)


def check_tucker_ranks(g: ConvGeometry, ranks: tuple[int, int]) -> tuple[int, int]:
    limit = tucker_max_ranks(g)
    if len(ranks) != 2:
        raise RankError(f"Tucker ranks must be a pair (r_out, r_in), got {tuple(ranks)}")
    for r, top, what in zip(ranks, limit, ("r_out", "r_in")):
        if not 1 <= r <= top:
            raise RankError(f"{what}={r} is outside 1..{top} (full rank of this conv)")
    return int(ranks[0]), int(ranks[1])


def tucker_ratio(g: ConvGeometry, ranks: tuple[int, int]) -> float:
    return conv_cost(g).params / tucker_chain_cost(g, ranks).params


def _round_down(r: float, multiple: int, top: int) -> int:
    return min(top, max(multiple, int(r // multiple) * multiple))


def tucker_ranks_for_ratio(g: ConvGeometry, ratio: float, round_to: int = 1,
                           floor: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """Largest proportional ranks, each at least its `floor`, whose weight compression ratio is >= `ratio`."""
    if not ratio > 1:
        raise RankError(f"ratio must be > 1, got {ratio}")
    if round_to < 1:
        raise RankError(f"round_to must be >= 1, got {round_to}")
    top_out, top_in = tucker_max_ranks(g)
    best = None
    least_out, least_in = min(floor[0], top_out), min(floor[1], top_in)
    for r_out in range(round_to, top_out + 1, round_to):
        r_in = _round_down(max(1.0, r_out * g.in_channels / g.out_channels), round_to, top_in)
        pair = (max(r_out, least_out), max(r_in, least_in))
        if tucker_ratio(g, pair) >= ratio:
            best = pair
    if best is None:
        smallest = (max(min(round_to, top_out), least_out), max(min(round_to, top_in), least_in))
        kept = f" keeping ranks of at least {least_out}x{least_in}" if (least_out, least_in) != (1, 1) else ""
        raise RankError(
            f"ratio {ratio:g} is out of reach{kept}: the smallest Tucker form, ranks {smallest}, "
            f"compresses this conv only {tucker_ratio(g, smallest):.2f}x"
        )
    return best


def rank_for_energy(spectrum: torch.Tensor, energy: float) -> int:
    """Smallest rank whose leading squared singular values (descending) hold `energy` of the total."""
    if not 0 < energy <= 1:
        raise RankError(f"energy must be in (0, 1], got {energy}")
    share = spectrum.cumsum(0) / spectrum.sum().clamp_min(1e-300)
    return int(min(len(spectrum), int((share < energy - 1e-12).sum()) + 1))


def _vbmf_threshold(alpha: float) -> float:
    """tau solving log(tau + 1) + alpha log(tau / alpha + 1) - tau = 0, tau > 0 (by bisection)."""
    f = lambda t: math.log(t + 1) + alpha * math.log(t / alpha + 1) - t  # noqa: E731
    lo, hi = 1e-9, 1.0
    while f(hi) > 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def vbmf_rank(matrix: torch.Tensor) -> int:
    """The rank empirical variational Bayesian matrix factorization keeps (Nakajima et al., JMLR 2013):
    the noise variance is the minimiser of the EVBMF free energy, found by a bounded 1-D search, and the
    rank is the number of singular values above the threshold it implies. No tuning parameter."""
    y = matrix.detach().double()
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = torch.linalg.svdvals(y)
    alpha = L / M
    tau = _vbmf_threshold(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    H = max(1, min(L - 1, math.ceil(L / (1 + alpha)) - 1))  # the largest rank the bound allows
    energy = s ** 2
    upper = float(energy.sum()) / (L * M)
    lower = max(float(energy[H]) / (M * x_bar), float(energy[H:].sum()) / (M * (L - H)))
    def free_energy(var: float) -> float:
        x = energy / (M * var)
        big = x[x > x_bar]
        t = 0.5 * (big - (1 + alpha) + torch.sqrt((big - (1 + alpha)) ** 2 - 4 * alpha))
        return float((x - torch.log(x)).sum() + (torch.log(t + 1) + alpha * torch.log(t / alpha + 1) - t).sum())

    # golden-section search of the free energy over [lower, upper], in log space
    a, b = math.log(min(lower, upper)), math.log(upper)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = free_energy(math.exp(c)), free_energy(math.exp(d))
    for _ in range(100):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = free_energy(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = free_energy(math.exp(d))
    var = math.exp((a + b) / 2)
    return int((energy / (M * var) > x_bar).sum())


def vbmf_weakened(matrix: torch.Tensor, weaken: float) -> int:
    """VBMF's rank moved `weaken` (0..1) of the way towards the matrix's full rank, at least 1."""
    full = min(matrix.shape)
    r = vbmf_rank(matrix)
    return max(1, min(full, r + round(weaken * (full - r))))
