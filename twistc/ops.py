"""Modules that passes insert: the DeepTwist weight projection and the lowered conv forms."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from twistc.decomp.svd import unlowered
from twistc.distributed import broadcast_
from twistc.decomp.tiling import TileGrid, TiledLowRank
from twistc.errors import NonFiniteError
from twistc.plan import LayerPlan, Plan, relative_change


class LowRankProjection(nn.Module):
    """DeepTwist's weight distortion, placed between a conv's weight and the conv.

    Its layer's entry in the compilation's plan (`plans`, the same object as the GraphModule's
    `state.plan`) says the decomposition and ranks: the plan is their one home. Each
    training-mode forward with grad enabled is one step; at every multiple of `period` the weight is
    replaced in place by its low-rank reconstruction, and after step `late_after` (when given) every
    `late_period` steps counted from there. With `target_change`, the period adapts instead: after
    each projection the next one comes P * target / change steps later (P the period just used,
    the factor kept within [1/2, 2]), so that a projection removes about `target_change` of the
    kernel's norm. Otherwise (eval mode, no_grad, export) it is the identity. `step`, `distortions`,
    `final_projections`, `change` (the relative Frobenius norm of what the last projection removed
    from the kernel) and, when adaptive, `current_period` and `next_at` are buffers, so they
    checkpoint. `distorted` says whether the last training forward projected. With `counting` off (the
    2nd to last micro-batch of a step that accumulates gradients) a training forward neither counts nor
    projects.
    """

    def __init__(self, layer: str, weight_name: str, plans: Plan, period: int, late_period: int | None = None,
                 late_after: int | None = None, target_change: float | None = None, stats=None):
        super().__init__()
        if period < 1 or (late_period is not None and late_period < 1):
            raise ValueError(f"periods must be >= 1, got {period} and {late_period}")
        if (late_period is None) != (late_after is None):
            raise ValueError("late_period and late_after go together")
        if target_change is not None and (late_period is not None or not 0 < target_change < 1):
            raise ValueError(f"target_change must be in (0, 1) and without late_period, got {target_change}")
        if plans.get(layer) is None:
            raise ValueError(f"the plan has no entry for layer {layer}")
        self.layer, self.weight_name, self.plans, self.period = layer, weight_name, plans, int(period)
        self.late_period, self.late_after, self.target_change = late_period, late_after, target_change
        self.fitted = None  # the factors of the last projection
        self.stats = stats  # the layer's input statistics, for a plan entry with fit=activation
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("distortions", torch.zeros((), dtype=torch.int64))
        self.register_buffer("final_projections", torch.zeros((), dtype=torch.int64))
        self.register_buffer("change", torch.zeros(()))
        self.distorted = False
        self.counting = True
        if target_change:
            self.register_buffer("current_period", torch.tensor(int(period)))
            self.register_buffer("next_at", torch.tensor(int(period)))  # the step of the next projection

    @property
    def plan(self) -> LayerPlan:
        return self.plans.get(self.layer)

    @property
    def decomp(self) -> str:
        return self.plan.decomp

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(self.plan.ranks)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            if not self.counting:
                self.distorted = False
                return weight
            self.step += 1
            self.distorted = self.distorts_at(int(self.step))
            if self.distorted:
                self.change.copy_(self.project_(weight))
                self.distortions += 1
                if self.target_change:
                    self._adapt()
        return weight

    def distorts_at(self, step: int) -> bool:
        """Whether the forward of training step `step` (from 1) projects the weight."""
        if self.target_change:
            return step == int(self.next_at)
        if self.late_after is not None and step > self.late_after:
            return (step - self.late_after) % self.late_period == 0
        return step % self.period == 0

    def _adapt(self) -> None:
        """The next period from the change of the projection just made (rank 0's, under DDP)."""
        change = self.change.clone()
        broadcast_(change)
        period = int(self.current_period)
        wanted = round(period * self.target_change / max(float(change), 1e-12))
        self.current_period.fill_(max(1, min(2 * period, max(-(-period // 2), wanted))))
        self.next_at.copy_(self.step + self.current_period)

    @torch.no_grad()
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def project_(self, weight: torch.Tensor) -> torch.Tensor:
        """Replace `weight` in place by its low-rank reconstruction (in float32 or wider, whatever autocast
        is on around it); returns ||W - P(W)|| / ||W||."""
        if not torch.isfinite(weight).all():
            raise NonFiniteError(
                f"layer {self.layer}: weight is not finite at step {int(self.step)}; "
                "lower the learning rate or raise the ranks"
            )
        self.fitted = self.plan.factors(weight, self.stats)  # kept for a lowering whose fit is not unique (CP)
        projected = self.fitted.reconstruct()
        change = relative_change(weight, projected)
        weight.copy_(projected)
        broadcast_(weight)  # under DDP, every rank continues from rank 0's projection
        return change

    def finalize_(self, weight: torch.Tensor) -> None:
        """The final projection: afterwards the kernel is exactly low-rank."""
        self.change.copy_(self.project_(weight))
        self.final_projections += 1

    @torch.no_grad()
    def holds(self, weight: torch.Tensor) -> bool:
        """Whether `weight` is still the reconstruction of the last projection's factors."""
        return self.fitted is not None and torch.allclose(self.fitted.reconstruct(), weight, rtol=1e-6, atol=0)

    @property
    def finalized(self) -> bool:
        return int(self.final_projections) > 0

    def extra_repr(self) -> str:
        p = self.plan
        layout = f", order={p.order}" if p.order else ""
        layout += f", tile={p.tile}" if p.tile else (f", grid={p.grid}" if p.grid else "")
        late = f", late_period={self.late_period} after step {self.late_after}" if self.late_period else ""
        late += f", target_change={self.target_change}, now {int(self.current_period)}" if self.target_change else ""
        return f"layer={self.layer}, decomp={p.decomp}, ranks={p.ranks}{layout}, period={self.period}{late}"


def _conv_class(spatial: int) -> type[nn.Module]:
    """nn.Conv1d for a kernel of one spatial dim (a Conv1d's lowering), else nn.Conv2d."""
    return nn.Conv1d if spatial == 1 else nn.Conv2d


def _pointwise(matrix: torch.Tensor, spatial: int) -> torch.Tensor:
    """A [out, in] matrix as the weight of a 1x1 (or size-1) conv with `spatial` spatial dims."""
    return matrix.reshape(*matrix.shape, *(1,) * spatial)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value)


class TuckerConv(nn.Sequential):
    """The Tucker-2 chain: 1x1 (S->r_in), kh x kw (r_in->r_out), 1x1 (r_out->T, with the bias).

    The reducing 1x1 runs before padding and stride; it commutes with every padding mode because
    it mixes channels pixel by pixel and padding copies or zeroes pixels channel by channel.
    """

    def __init__(self, conv_args: dict, u_out: torch.Tensor, core: torch.Tensor, u_in: torch.Tensor,
                 bias: torch.Tensor | None):
        r_out, r_in, *kernel = core.shape
        like = {"dtype": core.dtype, "device": core.device}  # the model's own dtype and device
        conv = _conv_class(len(kernel))
        super().__init__()
        self.add_module("reduce", conv(u_in.shape[0], r_in, 1, bias=False, **like))
        self.add_module("core", conv(r_in, r_out, tuple(kernel), bias=False, **conv_args, **like))
        self.add_module("expand", conv(r_out, u_out.shape[0], 1, bias=bias is not None, **like))
        _set(self.reduce.weight, _pointwise(u_in.T, len(kernel)))
        _set(self.core.weight, core)
        _set(self.expand.weight, _pointwise(u_out, len(kernel)))
        if bias is not None:
            _set(self.expand.bias, bias)


class SvdConv(nn.Sequential):
    """K ~= U V as two convs: kh x kw (S->r, the rows of V as kernels), then 1x1 (r->T, U, the bias)."""

    def __init__(self, conv_args: dict, kernel: tuple[int, ...], u: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor | None, order: str):
        r, s = v.shape[0], v.shape[1] // math.prod(kernel)
        like = {"dtype": v.dtype, "device": v.device}
        conv = _conv_class(len(kernel))
        super().__init__()
        self.add_module("reduce", conv(s, r, tuple(kernel), bias=False, **conv_args, **like))
        self.add_module("expand", conv(r, u.shape[0], 1, bias=bias is not None, **like))
        _set(self.reduce.weight, unlowered(v, (r, s, *kernel), order))
        _set(self.expand.weight, _pointwise(u, len(kernel)))
        if bias is not None:
            _set(self.expand.bias, bias)


class SvdLinear(nn.Sequential):
    """W ~= U V as two Linear layers: in -> r (V), then r -> out (U, the bias)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
        like = {"dtype": u.dtype, "device": u.device}
        super().__init__()
        self.add_module("reduce", nn.Linear(v.shape[1], v.shape[0], bias=False, **like))
        self.add_module("expand", nn.Linear(u.shape[1], u.shape[0], bias=bias is not None, **like))
        _set(self.reduce.weight, v)
        _set(self.expand.weight, u)
        if bias is not None:
            _set(self.expand.bias, bias)


class CpConv(nn.Sequential):
    """The CP chain: 1x1 (S->R), depthwise kh x 1 and 1 x kw (each R channels), 1x1 (R->T, with the bias).

    The depthwise convs split the original sampling by axis: the kh x 1 conv takes the row stride,
    padding and dilation, the 1 x kw conv the column ones. Padding columns commutes with a conv along
    the rows, so this equals the 2-D padding in every padding mode.
    """

    def __init__(self, conv_args: dict, out: torch.Tensor, inp: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor, bias: torch.Tensor | None):
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
        _set(self.reduce.weight, inp.T[:, :, None, None])
        _set(self.rows.weight, rows.T[:, None, :, None])
        _set(self.cols.weight, cols.T[:, None, None, :])
        _set(self.expand.weight, out[:, :, None, None])
        if bias is not None:
            _set(self.expand.bias, bias)


def pair(v) -> tuple[int, int] | str:
    """A conv's stride, padding or dilation as a pair (a padding string as it is)."""
    return v if isinstance(v, str) else ((v, v) if isinstance(v, int) else tuple(v))


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
