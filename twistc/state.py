"""What a compilation knows besides the graph: per-layer records, the plan, the untraceable leaves.

It lives in `gm.meta["twistc"]`, so it travels with the GraphModule through every pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from twistc.decomp.cost import ConvGeometry, Cost, conv_cost
from twistc.plan import LayerPlan, Plan

META_KEY = "twistc"
PLANNED_DENSE = "left dense by the plan"


@dataclass(frozen=True)
class Skip:
    """Why a pass leaves a layer as it is (in place of its plan entry). A `weak` reason (the pass does not
    take this kind of layer at all) does not replace a reason an earlier pass gave."""

    reason: str
    weak: bool = False


@dataclass
class LayerRecord:
    """One conv of the original model and what the passes did to it; what was decided for it (its
    decomposition, ranks, layout) is its plan entry, `CompileState.plan`."""

    name: str
    geometry: ConvGeometry
    lowering: str | None = None  # the form it was lowered to
    projected: bool = False  # trained under a DeepTwist projection
    skip_reason: str | None = None
    after: Cost | None = None
    form: str | None = None   # the im2col method or block form a 2-D lowering used
    tiles: dict | None = None  # 2-D lowerings: LayerPlan.tiling()
    final_projection_change: float | None = None  # ||W - P(W)|| / ||W|| at DeepTwist's final projection
    latency_before: float | None = None  # plan-latency: the dense conv's measured median (ms)
    latency_after: float | None = None   # ... and the chosen form's
    approx_error: float | None = None    # ... and its relative kernel error as planned
    accuracy_drop: float | None = None   # ... and, with objective=eval or max_drop, the accuracy it costs alone
    shared_with: str | None = None  # a conv whose weight is this one's (tied weights): its lowering is reused
    module: str | None = None  # the path of its lowered module
    fit: str | None = None  # what its factors were fitted to: "activation" (its inputs), or "weight" and why
    output_error: float | None = None  # with input statistics: the lowering's relative error on the layer's output

    @property
    def before(self) -> Cost:
        return conv_cost(self.geometry)

    @property
    def current(self) -> Cost:
        return self.after if self.after is not None else self.before

    def to_json(self, entry: LayerPlan | None = None) -> dict:
        """The layer in report.json; `entry` (its plan entry) gives its decomposition and ranks where a pass
        acted on it."""
        g, before, now = self.geometry, self.before, self.current
        acted = entry if (self.lowering or self.projected) and entry is not None else None
        return {
            "name": self.name,
            "kind": g.kind,
            "shape": [g.out_channels, g.in_channels // g.groups, *g.kernel],
            "groups": g.groups,
            "in_hw": list(g.in_hw),
            "out_hw": list(g.out_hw),
            "decomp": acted and acted.decomp,
            "lowering": self.lowering,
            "form": self.form,
            "skip_reason": None if self.lowering else (
                f"shares its weight with {self.shared_with}" if self.shared_with else self.skip_reason),
            "ranks": list(acted.ranks) if acted and acted.ranks else None,
            "ratio_requested": acted and acted.ratio,
            "ratio_achieved": before.params / now.params,
            "params_before": before.params,
            "params_after": now.params,
            "macs_before": before.macs,
            "macs_after": now.macs,
            "flops_before": 2 * before.macs,
            "flops_after": 2 * now.macs,
            "tiles": self.tiles,
            "final_projection_change": self.final_projection_change,
            "latency_before": self.latency_before,
            "latency_after": self.latency_after,
            "speedup": (self.latency_before / self.latency_after
                        if self.latency_before and self.latency_after else None),
            "approx_error": self.approx_error,
            "accuracy_drop": self.accuracy_drop,
            "shared_with": self.shared_with,
            "fit": self.fit,
            "output_error": self.output_error,
        }


@dataclass
class CompileState:
    example_inputs: tuple
    output_shapes: list[tuple[int, ...]]
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    leaves: dict[str, str] = field(default_factory=dict)   # module path -> why it is a leaf
    plan: Plan = field(default_factory=Plan)
    latency: dict | None = None  # plan-latency: runtime settings, measured and predicted model latency
    calibration: dict = field(default_factory=dict)  # calibrate: layer -> whiten.InputStats of its inputs

    def skip(self, name: str, skip: Skip) -> None:
        record = self.layers.get(name)
        if record is None or record.lowering is not None or (skip.weak and record.skip_reason):
            return
        if not (record.skip_reason or "").startswith(PLANNED_DENSE):  # the plan's reason for a dense layer stays
            record.skip_reason = skip.reason


def state_of(gm: fx.GraphModule) -> CompileState:
    state = gm.meta.get(META_KEY)
    if state is None:
        raise ValueError("this GraphModule was not made by twistc.trace(); trace the model first")
    return state
