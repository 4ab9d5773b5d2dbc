"""im2col and the modules of the forms built on it: a conv's input unrolled into columns, then low-rank
matrix products (whole, or per tile) in place of the conv; and two tiled forms that need no im2col matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from twistc.decomp.tiling import TileGrid, TiledLowRank


def same_padding(kernel, dilation) -> tuple[int, int, int, int]:
    """padding='same' as explicit (left, right, top, bottom), the extra pixel going right/bottom."""
    pads = []
    for k, d in zip(reversed(kernel), reversed(dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class Im2Col(nn.Module):
    """Input [B, S, H, W] -> columns [B, S*kh*kw, Hout*Wout] in the given column order.

    `method` picks an exact implementation: "unfold" (F.unfold; gathers in ONNX), "onehot" (a
    grouped conv whose one-hot kernels copy each tap into its own channel) or "slices" (one strided
    slice of the padded input per kernel tap, concatenated).
    """

    METHODS = ("onehot", "slices", "unfold")

    def __init__(self, channels: int, kernel, stride, padding, dilation, padding_mode: str = "zeros",
                 order: str = "channel-major", method: str = "onehot"):
        super().__init__()
        if method not in self.METHODS:
            raise ValueError(f"im2col method must be one of {', '.join(self.METHODS)}, got {method!r}")
        self.kernel, self.stride, self.dilation = tuple(kernel), tuple(stride), tuple(dilation)
        self.pads = same_padding(kernel, dilation) if padding == "same" else (
            padding[1], padding[1], padding[0], padding[0])
        self.mode = "constant" if padding_mode == "zeros" else padding_mode
        self.channels, self.order, self.method = channels, order, method
        taps = kernel[0] * kernel[1]
        if method == "onehot":
            onehot = torch.zeros(channels * taps, 1, *kernel)
            onehot.view(channels, taps, -1)[:, torch.arange(taps), torch.arange(taps)] = 1
            self.register_buffer("onehot", onehot)

    @classmethod
    def of(cls, g, order: str, method: str) -> "Im2Col":
        """The im2col of a conv of geometry `g` (kernel, stride, padding and its mode, dilation)."""
        return cls(g.in_channels, g.kernel, g.stride, g.padding, g.dilation, g.padding_mode, order, method)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads, mode=self.mode) if any(self.pads) else x

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The padded input as seen by each kernel tap, row-major over taps: kh*kw x [B, S, Hout, Wout]."""
        x = self.pad(x)
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        h, w = self.output_hw(x.shape[2], x.shape[3], padded=True)
        return [x[:, :, p * dh: p * dh + sh * (h - 1) + 1: sh, q * dw: q * dw + sw * (w - 1) + 1: sw]
                for p in range(kh) for q in range(kw)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "slices":
            taps = torch.stack(self.taps(x), dim=1 if self.order == "tap-major" else 2)
            return taps.flatten(1, 2).flatten(2)
        x = self.pad(x)
        if self.method == "onehot":
            cols = F.conv2d(x, self.onehot, None, self.stride, 0, self.dilation, self.channels).flatten(2)
        else:
            cols = F.unfold(x, self.kernel, self.dilation, 0, self.stride)
        if self.order == "tap-major":
            b, _, p = cols.shape
            cols = cols.view(b, self.channels, -1, p).transpose(1, 2).reshape(b, -1, p)
        return cols

    def output_hw(self, h, w, padded: bool = False):
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        if not padded:
            h, w = h + self.pads[2] + self.pads[3], w + self.pads[0] + self.pads[1]
        return (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1


class LowRankGemm(nn.Module):
    """im2col, then per tile U_ij (V_ij X_j), summed over column tiles, reshaped back to an image.

    Tiles are zero-padded to a common shape (exact: padded rows of U and columns of V are zero), so
    all tiles run as two batched matrix products: Z = V_blocks @ X (per column tile) and
    Y = U_blocks @ Z (per row tile, over the stacked column tiles). Untiled SVD is the 1x1 grid.
    """

    def __init__(self, im2col: Im2Col, factors: TiledLowRank, bias: torch.Tensor | None):
        super().__init__()
        like = next(iter(factors.factors.values())).v  # the model's own dtype and device
        self.im2col = im2col.to(like.device, like.dtype)
        grid = factors.grid
        (gr, gc), (th, tw) = grid.shape, grid.tile
        r = max(f.rank for f in factors.factors.values())
        self.out_channels, self.columns = factors.shape
        self.grid, self.tile, self.rank = (gr, gc), (th, tw), r
        v_blocks = torch.zeros(gc, gr * r, tw, dtype=like.dtype, device=like.device)
        u_blocks = torch.zeros(gr, th, gc * r, dtype=like.dtype, device=like.device)
        for i, j, rs, cs in grid.tiles():
            f = factors.factors[i, j]
            v_blocks[j, i * r:i * r + f.rank, : cs.stop - cs.start] = f.v
            u_blocks[i, : rs.stop - rs.start, j * r:j * r + f.rank] = f.u
        self.v_blocks = nn.Parameter(v_blocks)
        self.u_blocks = nn.Parameter(u_blocks)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h, w = self.im2col.output_hw(x.shape[2], x.shape[3])
        cols = self.im2col(x)                                      # [B, N, P]
        (gr, gc), (th, tw), r = self.grid, self.tile, self.rank
        if gc * tw != self.columns:
            cols = F.pad(cols, (0, 0, 0, gc * tw - self.columns))
        z = self.v_blocks @ cols.view(b, gc, tw, -1)               # [B, gc, gr*r, P]
        z = z.view(b, gc, gr, r, -1).transpose(1, 2).reshape(b, gr, gc * r, -1)
        y = (self.u_blocks @ z).reshape(b, gr * th, -1)            # [B, gr*th, P]
        if gr * th != self.out_channels:
            y = y[:, : self.out_channels]
        if self.bias is not None:
            y = y + self.bias[:, None]
        return y.reshape(b, self.out_channels, h, w)

    def sum_over_column_tiles(self, z: torch.Tensor) -> torch.Tensor:
        """Y_i = sum_j U_ij Z_ij as a 1x1 conv grouped by row tile; z is [B, gc*gr*r, H, W] in (j, i, k) order."""
        (gr, gc), (th, _), r = self.grid, self.tile, self.rank
        b, _, h, w = z.shape
        if gr > 1:
            z = z.view(b, gc, gr, r, h, w).transpose(1, 2).reshape(b, gr * gc * r, h, w)
        y = F.conv2d(z, self.u_blocks.view(gr * th, gc * r, 1, 1), groups=gr)
        if gr * th != self.out_channels:
            y = y[:, : self.out_channels]
        return y if self.bias is None else y + self.bias[:, None, None]


class TapBlockGemm(LowRankGemm):
    """Tiled products without an im2col matrix, for tap-major tiles that are channel blocks of one tap.

    Column tile j is then channels [b*tw, (b+1)*tw) of kernel tap t (j = t*S/tw + b), so V_ij X_j is
    a 1x1 conv on that tap's strided slice of the input: one grouped 1x1 conv per tap computes the
    V products of all its tiles, and one 1x1 conv grouped by row tile sums U_ij over j.
    """

    def __init__(self, im2col: Im2Col, factors: TiledLowRank, bias: torch.Tensor | None):
        widths = {b - a for a, b in factors.grid.cols}
        if im2col.order != "tap-major" or len(widths) > 1 or im2col.channels % widths.pop():
            raise ValueError(f"tap-blocks needs order=tap-major and column tiles of one width that divides "
                             f"the {im2col.channels} input channels")
        super().__init__(im2col, factors, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.im2col.taps(x)
        gr, tw, r = self.grid[0], self.tile[1], self.rank
        blocks = self.im2col.channels // tw
        v = self.v_blocks.view(len(taps), blocks * gr * r, tw, 1, 1)
        z = torch.cat([F.conv2d(tap, v[t], groups=blocks) for t, tap in enumerate(taps)], 1)  # (j, i, k)
        return self.sum_over_column_tiles(z)


class ChannelBlockConv(LowRankGemm):
    """Tiled products as two grouped convs, for channel-major tiles that are blocks of whole input channels.

    Under channel-major order a column tile of width m*kh*kw is m input channels with all their taps,
    so V_ij X_j is a kh x kw conv on those channels: one conv grouped by column tile computes every
    V product, and one 1x1 conv grouped by row tile sums U_ij over j. No im2col matrix is built.
    """

    def __init__(self, im2col: Im2Col, factors: TiledLowRank, bias: torch.Tensor | None):
        if not self.fits(im2col.order, im2col.kernel, factors.grid):
            raise ValueError(f"channel-blocks needs order=channel-major and column tiles of one width that is a "
                             f"multiple of kh*kw = {im2col.kernel[0] * im2col.kernel[1]}")
        super().__init__(im2col, factors, bias)

    @staticmethod
    def fits(order: str, kernel, grid: TileGrid) -> bool:
        widths = {b - a for a, b in grid.cols}
        return order == "channel-major" and len(widths) == 1 and widths.pop() % (kernel[0] * kernel[1]) == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        im, (gr, gc), (_, tw), r = self.im2col, self.grid, self.tile, self.rank
        left, right, top, bottom = im.pads
        padding = (top, left)
        if im.mode != "constant" or left != right or top != bottom:
            x, padding = im.pad(x), 0
        v = self.v_blocks.view(gc * gr * r, tw // (im.kernel[0] * im.kernel[1]), *im.kernel)
        return self.sum_over_column_tiles(F.conv2d(x, v, None, im.stride, padding, im.dilation, gc))
