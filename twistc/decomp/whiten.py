"""Data-aware factors: low-rank approximations that minimise a layer's output error on its inputs.

A layer computes y = K p, with K its lowered matrix [T, n] and p an input column (a Linear layer's
input, or one im2col patch of a conv, channel-major). With C = E[p p^T] the inputs' second moment,
the expected output error of an approximation K' is

    E ||(K - K') p||^2 = ||(K - K') R||_F^2,   C = R R^T.

So the best rank-r K' is the truncated SVD of K R taken back through R^-1 (whitened SVD, as SVD-LLM
does for LLMs): exact at full rank, and plain SVD when the inputs are white (C = I). For Tucker-2
the input-channel factor comes from HOOI of the kernel whitened over its input-channel mode, and the
output factor and core are then the exact least-squares optimum for the full patch covariance,
given that input factor.

C is damped by a small multiple of its mean eigenvalue, so a dead channel or a rank-deficient
batch leaves it invertible; inputs that are all zero or not finite give no whitening (`whitener`
returns None) and callers fall back to the kernel fit. Work happens in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from twistc.decomp.modes import mode_dot
from twistc.decomp.svd import LowRank, balanced, lowered, singular_energies, unlowered

Tensor = torch.Tensor
DAMPING = 1e-6  # of the mean eigenvalue, added to every eigenvalue of C


@dataclass
class InputStats:
    """The second moment of a layer's input columns (channel-major patches), summed over `count` columns."""

    moment: Tensor  # [n, n], float64: the sum of p p^T
    count: int

    @property
    def covariance(self) -> Tensor:
        return self.moment / max(self.count, 1)

    def in_order(self, shape: tuple[int, ...], order: str) -> Tensor:
        """The covariance with its columns in `order` (tap-major or channel-major) for a kernel of `shape`."""
        cov = self.covariance
        if order == "channel-major" or len(shape) == 2:
            return cov
        index = lowered(torch.arange(cov.shape[0]).reshape(1, *shape[1:]), order)[0]
        return cov[index][:, index]

    def channels(self, shape: tuple[int, ...]) -> Tensor:
        """The input-channel covariance [S, S]: the patch covariance's channel blocks averaged over taps."""
        s, taps = shape[1], max(1, self.covariance.shape[0] // shape[1])
        blocks = self.covariance.reshape(s, taps, s, taps)
        return torch.diagonal(blocks, dim1=1, dim2=3).mean(-1)


def whitener(cov: Tensor) -> tuple[Tensor, Tensor] | None:
    """(R, R^-1) with R R^T = C + damping; None when C holds no information (zero or not finite)."""
    cov = cov.double()
    cov = (cov + cov.T) / 2
    if not torch.isfinite(cov).all() or float(torch.trace(cov)) <= 0:
        return None
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp_min(0) + DAMPING * float(torch.trace(cov)) / cov.shape[0]
    root = values.sqrt()
    return vectors * root, (vectors / root).T


def whitened_svd(matrix: Tensor, cov: Tensor, rank: int) -> LowRank | None:
    """The rank-`rank` factors U [m, r], V [r, n] minimising ||(K - U V) R||_F (see the module docstring);
    None when `cov` gives no whitening."""
    w = whitener(cov)
    if w is None:
        return None
    r, r_inv = w
    u, s, vh = torch.linalg.svd(matrix.detach().double() @ r, full_matrices=False)
    rank = min(rank, s.numel())
    low = balanced(u[:, :rank] * s[:rank], vh[:rank] @ r_inv)
    return LowRank(low.u.to(matrix.dtype), low.v.to(matrix.dtype))


def output_error(matrix: Tensor, approx: Tensor, cov: Tensor) -> float:
    """sqrt(E||(K - K') p||^2 / E||K p||^2): the approximation's relative error on the layer's output."""
    k, cov = matrix.detach().double(), cov.double()
    d = k - approx.detach().double()
    return float((torch.trace(d @ cov @ d.T).clamp_min(0) / torch.trace(k @ cov @ k.T).clamp_min(1e-300)).sqrt())


def whitened_truncation_errors(matrix: Tensor, cov: Tensor, ranks: list[int]) -> list[float] | None:
    """The relative output error of the whitened SVD at each rank, from one SVD (Eckart-Young in the
    whitened space); None when `cov` gives no whitening."""
    w = whitener(cov)
    if w is None:
        return None
    energies = singular_energies(matrix.detach().double() @ w[0])
    total = energies.sum().clamp_min(1e-300)
    tail = energies.flip(0).cumsum(0).flip(0)
    return [float((tail[r] / total).sqrt()) if r < len(energies) else 0.0 for r in ranks]


def tucker2_whitened(weight: Tensor, stats: InputStats, ranks: tuple[int, int], fit):
    """Tucker-2 factors (core, u_out, u_in) for the layer's inputs: `fit(kernel, ranks)` (HOOI) of the
    kernel whitened over its input channels gives the input factor; the output factor and core are the
    least-squares optimum for the patch covariance given it. None when the statistics give no whitening."""
    shape = tuple(weight.shape)
    channel, patch = whitener(stats.channels(shape)), whitener(stats.covariance)
    if channel is None or patch is None:
        return None
    r_c, r_c_inv = channel
    w = weight.detach().double()
    whitened = mode_dot(w, r_c.T, 1)
    u_in = r_c_inv.T @ fit(whitened, ranks).u_in.double()  # back to the unwhitened input channels
    taps = w[0, 0].numel()
    p = torch.kron(u_in, torch.eye(taps, dtype=torch.float64))  # [S*taps, r_in*taps]: channel-major columns
    cov = stats.covariance.double()
    cov = cov + DAMPING * float(torch.trace(cov)) / cov.shape[0] * torch.eye(cov.shape[0], dtype=torch.float64)
    k = lowered(w)
    projected_cov = p.T @ cov @ p
    best = torch.linalg.solve(projected_cov, (k @ cov @ p).T).T  # [T, r_in*taps]: K's least-squares map
    low = whitened_svd(best, projected_cov, ranks[0])
    if low is None or low.rank < ranks[0]:
        return None
    q, upper = torch.linalg.qr(low.u.double())
    core = unlowered(upper @ low.v.double(), (ranks[0], u_in.shape[1], *shape[2:]))
    q_in, upper_in = torch.linalg.qr(u_in)  # orthonormal input factor, as HOOI's: the whitening's inverse
    core = mode_dot(core, upper_in, 1)       # goes into the core (see svd.balanced)
    return core, q, q_in
