"""A tensor's mode-n unfolding and its product with a matrix along one mode."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def unfold(t: Tensor, mode: int) -> Tensor:
    """[dim of mode, product of the others]: the mode's fibres as columns, the other modes in order."""
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def mode_dot(t: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """t x_mode matrix: the mode's dimension d becomes matrix.shape[0], for a matrix [new, d]."""
    return torch.tensordot(t, matrix, dims=([mode], [1])).movedim(-1, mode)
