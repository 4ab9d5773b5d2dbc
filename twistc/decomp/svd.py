"""2-D low-rank approximation of a conv kernel through its lowered (im2col) matrix.

    K[T, S*kh*kw] = lowered(W, order),   K ~= U[T, r] V[r, S*kh*kw]   (truncated SVD)

Column orders: `channel-major` (S, kh, kw) is PyTorch's `weight.reshape(T, -1)` and F.unfold's
row order; `tap-major` (kh, kw, S) puts one kernel tap across all input channels in S adjacent
columns. The singular values are split evenly between U and V (U = U_r sqrt(s), V = sqrt(s) V_r^T).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor
ORDERS = ("channel-major", "tap-major")


def lowered(weight: Tensor, order: str = "channel-major") -> Tensor:
    """The T x (S*kh*kw) matrix of a kernel, columns in `order`."""
    t = weight.shape[0]
    if order == "channel-major" or weight.dim() == 2:
        return weight.reshape(t, -1)
    if order == "tap-major":  # the taps of a 4-D (Conv2d) or 3-D (Conv1d) kernel before its channels
        return weight.permute(0, *range(2, weight.dim()), 1).reshape(t, -1)
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def unlowered(matrix: Tensor, shape: tuple[int, ...], order: str = "channel-major") -> Tensor:
    """Inverse of `lowered`: the kernel of `shape` (T, S, kh, kw) whose lowered matrix is `matrix` (a
    Linear layer's [T, S] weight is its own lowered matrix)."""
    if len(shape) == 2 or order == "channel-major":
        return matrix.reshape(shape)
    if order == "tap-major":
        t, s, *taps = shape
        return matrix.reshape(t, *taps, s).permute(0, len(shape) - 1, *range(1, len(shape) - 1)).contiguous()
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


@dataclass(frozen=True)
class LowRank:
    u: Tensor  # [m, r]
    v: Tensor  # [r, n]

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def reconstruct(self) -> Tensor:
        return self.u @ self.v


def truncated_svd(matrix: Tensor, rank: int) -> LowRank:
    """Best rank-`rank` factors of `matrix` (Eckart-Young), computed in float64.

    The leading singular vectors of the shorter side come from the eigenvectors of its Gram matrix (a
    matrix product and a small eigh, several times faster than an SVD of the whole matrix); those of the
    other side follow by one product. Singular values below 1e-7 of the largest (float32's resolution
    of the product) carry nothing a float32 layer keeps, so their directions are dropped, not divided by."""
    m = matrix.detach().double()
    tall = m.shape[0] > m.shape[1]
    short = m.T if tall else m  # [k, n], k <= n
    values, vectors = torch.linalg.eigh(short @ short.T)
    rank = min(rank, values.numel())
    values, vectors = values.flip(0)[:rank].clamp_min(0), vectors.flip(1)[:, :rank]
    s = values.sqrt()
    kept = s > 1e-7 * (s[0] if s.numel() else 0.0)
    root = s.sqrt()
    near = vectors * root  # U sqrt(s) on the short side
    far = torch.where(kept[:, None], (vectors.T @ short) / root.clamp_min(1e-300)[:, None], 0.0)  # sqrt(s) V^T
    u, v = (far.T, near.T) if tall else (near, far)
    return LowRank(u.to(matrix.dtype), v.to(matrix.dtype))


def balanced(u: Tensor, v: Tensor) -> LowRank:
    """The same product U V as factors conditioned like a truncated SVD's: orthonormal columns of U and rows
    of V, each scaled by the square root of the singular values. Exact: QR of each side, SVD of the small
    r x r middle. Factors fitted through a whitening carry its inverse (large entries along the inputs'
    quiet directions), which gradient descent then trains badly; balanced ones train like the kernel fit's."""
    qu, ru = torch.linalg.qr(u.detach().double())
    qv, rv = torch.linalg.qr(v.detach().double().T)
    a, s, bh = torch.linalg.svd(ru @ rv.T)
    root = s.sqrt()
    return LowRank((qu @ a * root).to(u.dtype), (root[:, None] * bh @ qv.T).to(v.dtype))


def singular_energies(matrix: Tensor) -> Tensor:
    """The squared singular values, descending: the eigenvalues of the shorter side's Gram matrix."""
    m = matrix.detach().double()
    short = m.T if m.shape[0] > m.shape[1] else m
    return torch.linalg.eigvalsh(short @ short.T).flip(0).clamp_min(0)


def truncation_errors(matrix: Tensor, ranks: list[int]) -> list[float]:
    """||K - K_r|| / ||K|| of the best rank-r approximation, for each r (Eckart-Young)."""
    energies = singular_energies(matrix)
    total = energies.sum().clamp_min(1e-300)
    tail = energies.flip(0).cumsum(0).flip(0)  # tail[i] = sum of energies from i on
    return [float((tail[r] / total).sqrt()) if r < len(energies) else 0.0 for r in ranks]
