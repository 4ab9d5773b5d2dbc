"""DeepTwist's projection module: the weight distortion that sits between a layer's weight and the layer."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from twistc.distributed import broadcast_
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
    kernel's norm. With `ramp`, the projections of the first `ramp` steps keep more than the plan's
    ranks: from `full_ranks` they fall to the plan's on a cubic schedule (gradual compression, as Zhu
    and Gupta's gradual pruning), so that the network is not cut to its final ranks at once. Otherwise
    (eval mode, no_grad, export) it is the identity. `step`, `distortions`,
    `final_projections`, `change` (the relative Frobenius norm of what the last projection removed
    from the kernel) and, when adaptive, `current_period` and `next_at` are buffers, so they
    checkpoint. `distorted` says whether the last training forward projected. With `counting` off (the
    2nd to last micro-batch of a step that accumulates gradients) a training forward neither counts nor
    projects.
    """

    def __init__(self, layer: str, weight_name: str, plans: Plan, period: int, late_period: int | None = None,
                 late_after: int | None = None, target_change: float | None = None, stats=None, ramp: int = 0,
                 full_ranks: tuple[int, ...] | None = None):
        super().__init__()
        if ramp < 0 or (ramp and full_ranks is None):
            raise ValueError(f"a ramp needs steps >= 0 and the layer's full ranks, got {ramp} and {full_ranks}")
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
        self.ramp, self.full_ranks = int(ramp), full_ranks
        self.fitted = None  # the factors of the last projection at the plan's ranks
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
                self.change.copy_(self.project_(weight, self.ranks_at(int(self.step))))
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

    def ranks_at(self, step: int) -> tuple[int, ...]:
        """The ranks a projection at training step `step` keeps: the plan's, or more while the ramp lasts."""
        if step >= self.ramp:
            return self.ranks
        left = (1 - step / self.ramp) ** 3
        return tuple(r + math.ceil((top - r) * left) for r, top in zip(self.ranks, self.full_ranks))

    def next_distortion(self, step: int) -> int:
        """The first training step after `step` whose forward projects the weight."""
        if self.target_change:
            return int(self.next_at)
        early = (step // self.period + 1) * self.period
        if self.late_after is None or early <= self.late_after:
            return early
        return self.late_after + (max(step - self.late_after, 0) // self.late_period + 1) * self.late_period

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
    def project_(self, weight: torch.Tensor, ranks: tuple[int, ...] | None = None) -> torch.Tensor:
        """Replace `weight` in place by its low-rank reconstruction at `ranks` (default: the plan's), in
        float32 or wider, whatever autocast is on around it; returns ||W - P(W)|| / ||W||."""
        if not torch.isfinite(weight).all():
            raise NonFiniteError(
                f"layer {self.layer}: weight is not finite at step {int(self.step)}; "
                "lower the learning rate or raise the ranks"
            )
        final = ranks is None or tuple(ranks) == self.ranks
        fitted = (self.plan if final else dataclasses.replace(self.plan, ranks=tuple(ranks))).factors(weight, self.stats)
        self.fitted = fitted if final else None  # kept for a lowering whose fit is not unique (CP)
        projected = fitted.reconstruct()
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
        late += f", ramp={self.ramp} steps from {self.full_ranks}" if self.ramp else ""
        return f"layer={self.layer}, decomp={p.decomp}, ranks={p.ranks}{layout}, period={self.period}{late}"
