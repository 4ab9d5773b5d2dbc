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
    """Best rank-`rank` factors of `matrix` (Eckart-Young), computed in float64."""
    m = matrix.detach().double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return LowRank((u[:, :rank] * root).to(matrix.dtype), (root[:, None] * vh[:rank]).to(matrix.dtype))


def singular_energies(matrix: Tensor) -> Tensor:
    return torch.linalg.svdvals(matrix.detach().double()) ** 2


def truncation_errors(matrix: Tensor, ranks: list[int]) -> list[float]:
    """||K - K_r|| / ||K|| of the best rank-r approximation, for each r (Eckart-Young)."""
    energies = singular_energies(matrix)
    total = energies.sum().clamp_min(1e-300)
    tail = energies.flip(0).cumsum(0).flip(0)  # tail[i] = sum of energies from i on
    return [float((tail[r] / total).sqrt()) if r < len(energies) else 0.0 for r in ranks]
