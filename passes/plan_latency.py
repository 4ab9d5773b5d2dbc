"""plan-latency: choose each layer's form and ranks by latency measured in the target runtime.

    minimise  sum_l err_l(c_l)^2    over one candidate c_l per layer (dense, or a lowered form at some ranks)
    such that sum_l (dense_ms_l - ms_l(c_l)) >= model_ms (1 - 1/speedup)              (speedup=S)
         or  sum_l params_l(c_l) <= sum_l dense_params_l / ratio                      (ratio=R)
         or  sum_l macs_l(c_l) <= sum_l dense_macs_l / macs                           (macs=M)

    or, with max_drop=D, the fastest plan whose accuracy on eval_data() batches, with every chosen
    layer approximated at once, is at most D below the dense model's: the latency is minimised under a
    budget on the summed per-layer divergences of the output, and the budget is searched on the measured
    accuracy of the whole plan (before any fine-tuning).

Layers: Conv2d, Conv1d and Linear. Forms (`forms=`): Tucker-2 chains and SVD conv pairs (Conv2d,
Conv1d), SVD Linear pairs, and CP chains (Conv2d, not by default: its ALS fits are slow to rank).

`err` is the relative kernel reconstruction error (||W - W_r|| / ||W||; HOSVD's for Tucker, an upper
bound on what the lowering's HOOI reaches). With `objective=eval`, and for max_drop, the cost of a
candidate is instead how far the model's output moves on `eval_batches` batches of eval_data() when that
layer alone takes it (per-layer sensitivity, as AIMET measures it, but weighed against latency): the mean
KL divergence of its softmax from the dense model's, summed over layers. Not the accuracy drop: on a few
batches the accuracy of one layer's candidates moves in steps of a whole sample and many tie at zero
(summed, such drops chose worse plans on ResNet-32 than the kernel error did), and a loss change can be
negative alone yet add up to a loss.
Each candidate reruns only the part of the model that depends on its layer's weight (twistc.partial).
Latencies are medians measured with the real lowered modules at each layer's input shape
(twistc.latency), cached across compiles. The prediction subtracts each layer's measured saving from
the whole model's time: a layer timed alone pays costs the model does not (copying its output out of
the runtime), but its dense form and its candidates pay them alike. A candidate measured slower than
its dense layer is never chosen. The pass only writes the plan (and the predictions into
the layer records); deeptwist and the lowering passes consume it unchanged.
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from twistc import distributed, knapsack
from twistc.convs import ConvSite, conv_sites
from twistc.decomp import DECOMPOSITIONS, FORMS
from twistc.decomp.cost import conv_cost
from twistc.errors import RankError, SpecError, name_list
from twistc.latency import Runtime, measure_layer, model_key, model_timer, paired_medians
from twistc.latency_cache import LatencyCache
from twistc.partial import Suffix
from twistc.pipeline import Pass, PassResult, Pipeline, RunContext, register
from twistc.plan import LayerPlan
from twistc.passes.lower import Lowering
from twistc.passes.lowrank import (check_choice, check_layers_pattern, first_failure, floor_reason, keeps_floor, rank_floor,
                              selected)
from twistc.state import PLANNED_DENSE, Skip, state_of
from twistc.timing import Sampling
from twistc.evaluation import accuracy, class_scores, in_mode

log = logging.getLogger(__name__)

# the forms it can choose -> the decomposition of each: those built one way only (it chooses no im2col
# method or tiling, which change what a form stores and how fast it runs)
PLANNABLE = {name: d.name for name, (d, form) in FORMS.items() if not form.methods}
DENSE = LayerPlan("none", (), "none")
TARGETS = ("speedup", "ratio", "macs", "max_drop")
BISECTIONS = 12  # max_drop: divergence budgets tried
CHECK_ROUNDS = 3  # times a speedup plan is lowered, timed whole and, if short, planned again
SHORT = 0.95  # a timed plan below this share of the asked speedup is short: planned again, then refused
FEW_SAMPLES = 1000  # fewer planning samples than this get a warning (results/accuracy_target)


def short_of(reached: float, target: float) -> str:
    """A speedup that falls short of `target`, with the digits that show it does: 1.497x, not 1.50x."""
    digits = 2
    while digits < 6 and round(reached, digits) >= target:
        digits += 1
    return f"{reached:.{digits}f}x"


def at_most(reached: float) -> str:
    """A speedup to ask for instead, rounded down so that it stays within reach."""
    return f"{math.floor(reached * 100) / 100:.2f}x"


class Option(NamedTuple):
    """One way a layer can go in a plan: its dense form (entry None, first in each layer's list) or a candidate."""

    entry: LayerPlan | None
    ms: float             # measured alone
    error: float          # relative error: of the layer's output on its calibration inputs, else of its kernel
    drop: float | None    # objective=eval, max_drop: the accuracy it costs alone
    kl: float | None      # ... and the divergence of the model's output


class Decision(NamedTuple):
    """What the plan chose for one layer: the entry (DENSE keeps it), the dense form's and the chosen form's
    measured latency, the chosen form's error and accuracy cost, and why a layer stays dense."""

    entry: LayerPlan
    ms_before: float
    ms_after: float
    error: float
    drop: float | None
    why: str | None


@register
@dataclass(frozen=True)
class PlanLatency(Pass):
    name = "plan-latency"
    run_defaults = ("ratio", "cache", "threads")  # it measures where its device= says
    writes_plan = True
    takes_context = True
    exclusive = (TARGETS,)
    summary = ("planning: pick each layer's form and ranks by measured latency to reach speedup=S (or ratio=R, "
               "macs=M), or the fastest within an accuracy drop max_drop=D")
    option_help = {"speedup": "target: measured whole-model speedup", "ratio": "target: weight ratio of the layers",
                   "macs": "target: MAC ratio of the layers",
                   "max_drop": "target: the fastest plan losing at most this accuracy (0.01: a point) on "
                               "eval_batches batches",
                   "runtime": "where to measure: ort, torch (eager) or torch-compile",
                   "device": "ort: execution provider cpu or cuda; torch and torch-compile: cpu or cuda",
                   "threads": "threads of the runtime", "batch": "batch size to measure at",
                   "channels_last": "torch runtimes: time with 4-D weights and inputs in channels-last order",
                   "forms": f"candidate forms joined by |: {', '.join(PLANNABLE)}",
                   "steps": "rank grid: k/steps of each mode's full rank, k = 1..steps-1",
                   "round_to": "round ranks to multiples of this (default 8 on device=cuda, else 1)",
                   "layers": "fnmatch patterns of the layers it may compress",
                   "cache": "latency cache file (default ~/.cache/twistc/latency.json)",
                   "reps": "timed repetitions per candidate",
                   "objective": "kernel (summed squared kernel errors) or eval (summed output divergences)",
                   "eval_batches": "objective=eval: batches of eval_data() per measurement"}

    speedup: float | None = None
    ratio: float | None = None
    macs: float | None = None
    max_drop: float | None = None
    runtime: str = "ort"
    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    channels_last: bool = False
    forms: str = "tucker-chain|svd-conv|svd-linear"
    steps: int = 8
    round_to: int | None = None
    layers: str | None = None
    cache: str = ""
    reps: int = 25
    objective: str = "kernel"
    eval_batches: int = 2

    def __post_init__(self):
        if sum(getattr(self, k) is not None for k in TARGETS) != 1:
            raise SpecError("plan-latency needs exactly one of speedup=S, ratio=R (weights), macs=M (MACs) or "
                            "max_drop=D (accuracy)")
        if self.max_drop is not None and not 0 < self.max_drop < 1:
            raise SpecError(f"plan-latency: max_drop is a fraction of accuracy in (0, 1), e.g. 0.01 for one point, "
                            f"got {self.max_drop:g}")
        if self.max_drop is not None and self.objective != "kernel":
            raise SpecError("plan-latency: max_drop measures accuracy itself and minimises latency; leave out "
                            "objective")
        for key in TARGETS[:3]:
            value = getattr(self, key)
            if value is not None and not 1 < value < float("inf"):
                raise SpecError(f"plan-latency: {key} must be a finite number > 1, got {value:g}")
        for form in self.forms.split("|"):
            check_choice(form, tuple(PLANNABLE), "plan-latency forms")
        check_choice(self.objective, ("kernel", "eval"), "plan-latency objective")
        for key, least in (("steps", 2), ("round_to", 1), ("reps", 1), ("eval_batches", 1)):
            if getattr(self, key) is not None and getattr(self, key) < least:
                raise SpecError(f"plan-latency: {key} must be >= {least}, got {getattr(self, key)}")
        self.target()

    def check_complete(self, before, after) -> None:
        lowered = {form for stage in after if isinstance(stage, Lowering) for form in stage.allowed()}
        for form in self.forms.split("|"):
            if form not in lowered:
                rest = "|".join(f for f in self.forms.split("|") if f != form)
                raise SpecError(f"plan-latency may choose {form}, which no later pass lowers: add lower after "
                                f"it{f', or give forms={rest}' if rest else ''}")

    def needs(self) -> tuple[str, ...]:
        return ("eval_data",) if self.measures_accuracy else ()

    @property
    def measures_accuracy(self) -> bool:
        return self.objective == "eval" or self.max_drop is not None

    def target(self) -> Runtime:
        return Runtime(self.runtime, self.device, self.threads, self.batch, self.channels_last)

    @torch.no_grad()
    def __call__(self, gm: fx.GraphModule, ctx: RunContext | None = None) -> PassResult:
        state = state_of(gm)
        check_layers_pattern(self.name, self.layers, list(state.layers))
        batches = None
        if self.measures_accuracy and distributed.is_main():
            if ctx is None or ctx.eval_data is None:
                raise SpecError(f"plan-latency{{{'max_drop' if self.max_drop else 'objective=eval'}}} needs "
                                "eval_data() in MODEL.py")
            batches = list(itertools.islice(ctx.eval_data(), self.eval_batches))
        # under torchrun, rank 0 measures and decides; every rank takes its plan
        decided = distributed.broadcast_object(self.decide(gm, batches, ctx) if distributed.is_main() else None)
        if isinstance(decided, str):
            raise RankError(decided)
        layers, state.latency = decided
        for name, d in layers.items():
            state.plan.set(name, d.entry)
            record = state.layers[name]
            record.latency_before, record.latency_after, record.approx_error = d.ms_before, d.ms_after, d.error
            record.accuracy_drop = d.drop
            if d.entry.decomp == "none" and d.why:
                state.skip(name, Skip(f"{PLANNED_DENSE}: {d.why}"))
        rewrites = sum(d.entry.decomp != "none" for d in layers.values())
        log.info("plan-latency: %d of %d layers compressed, predicted %.3f -> %.3f ms (%.2fx)", rewrites, len(layers),
                 state.latency["model_ms_before"], state.latency["predicted_ms_after"],
                 state.latency["predicted_speedup"])
        return PassResult(gm, rewrites > 0, rewrites)

    def decide(self, gm: fx.GraphModule, batches: list | None = None,
               ctx: RunContext | None = None) -> tuple[dict[str, Decision], dict] | str:
        """Each layer's Decision, and the latency summary; or why the target is out of reach. `batches`: eval batches for
        objective=eval and max_drop. With the rest of the pipeline in `ctx`, the plan is also lowered and
        timed whole, and a speedup target re-planned where the model saves less than its layers did alone."""
        state = state_of(gm)
        runtime, cache = self.target(), LatencyCache(self.cache or None)
        sites = [s for s in conv_sites(gm) if s.name in state.layers and s.projection is None]
        options, whys = [], []  # whys: why a layer would stay dense (None: the lowering passes say it)
        baseline = (accuracy(gm, batches), scores(gm, batches)) if batches else None
        for site in tqdm(sites, desc="plan-latency: timing candidates", unit="layer", leave=False, disable=None):
            entries = [None] + (self.candidates(gm, site) if selected(self.layers, site.name) else [])
            errors = [0.0] + self.errors(gm, site, entries[1:])
            ms = measure_layer(site.geometry, entries, runtime, cache, reps=self.reps, dtype=site.weight(gm).dtype)
            keep = [i for i in range(len(entries)) if i == 0 or ms[i] < ms[0]]  # never slower than dense
            costs = ([(0.0, 0.0)] + alone_costs(gm, site, [entries[i] for i in keep[1:]], batches, baseline)
                     if batches else [(None, None)] * len(keep))
            options.append([Option(entries[i], ms[i], errors[i], *cost) for i, cost in zip(keep, costs)])
            met = "max_drop left no room for it" if self.max_drop else "target met without it"
            floor = rank_floor(gm, site)
            whys.append(met if len(keep) > 1 else "no form ran faster" if len(entries) > 1 else
                        f"not selected by layers={self.layers}" if not selected(self.layers, site.name) else
                        f"{floor_reason(site.geometry, floor)}, and no smaller form keeps them" if floor != (1, 1)
                        else None)
        model_ms = self.model_ms(gm, runtime, cache)
        cache.save()
        try:
            picks, drop = (self.fastest_within_drop(gm, sites, options, batches, baseline[0]) if self.max_drop
                           else (self.solve(sites, options, model_ms), None))
        except RankError as e:
            return str(e)
        predicted = _predicted_ms(model_ms, options, picks)
        checked = self.check_plan(gm, sites, options, picks, model_ms, runtime, cache, ctx)
        if checked is not None:
            alone = predicted
            picks, predicted, checked = checked
            if self.speedup and predicted >= model_ms:
                return (f"plan-latency: speedup {self.speedup:g} is out of reach in {runtime.runtime}/{runtime.device}: "
                        f"its plan, lowered and timed whole, ran at {model_ms / predicted:.2f}x of the dense model "
                        f"(its layers timed alone promised {model_ms / alone:.2f}x), so the savings do not survive "
                        "in the whole model; time it at another batch or runtime, or leave the model dense")
            if self.speedup and model_ms / predicted < SHORT * self.speedup:
                return (f"plan-latency: speedup {self.speedup:g} is out of reach in {runtime.runtime}/{runtime.device}: "
                        f"the best plan, lowered and timed whole ({len(checked)} round{'s' * (len(checked) > 1)}), gives "
                        f"{short_of(model_ms / predicted, self.speedup)}; {self.cap(sites, options, model_ms)}; ask for "
                        f"at most {at_most(model_ms / predicted)}")
        layers = {site.name: Decision(opts[i].entry or DENSE, opts[0].ms, opts[i].ms, opts[i].error, opts[i].drop, why)
                  for site, opts, i, why in zip(sites, options, picks, whys)}
        summary = {"runtime": runtime.to_json(), "target": {k: getattr(self, k) for k in TARGETS},
                   "model_ms_before": model_ms, "predicted_ms_after": predicted,
                   "predicted_speedup": model_ms / predicted, "cache": str(cache.path),
                   **({"plan_timed": checked} if checked else {}), **self.busy_timings(cache)}
        samples = sum(len(y) for _, y in batches) if batches else None
        if drop is not None:
            summary["accuracy_drop"] = {"max": self.max_drop, "measured": drop, "samples": samples}
        if samples is not None and samples < FEW_SAMPLES:
            what, why = (("max_drop was", "a plan that just fits them fits their noise too (on ResNet-32, plans "
                          "made on 500 lost more than max_drop on other images, plans made on 1,000 did not)")
                         if drop is not None else
                         ("the layers' sensitivities were", "fewer samples give noisier rankings of the layers"))
            log.warning("plan-latency: %s measured on %d samples; %s; eval_batches= takes more", what, samples, why)
        return layers, summary

    def model_ms(self, gm: fx.GraphModule, runtime: Runtime, cache: LatencyCache) -> float:
        """The whole model's median latency, from the cache (so that the same command plans the same
        again) or measured now."""
        example = state_of(gm).example_inputs
        key = f"{runtime.key()}|{model_key(gm, example)}"
        if cache.get(key) is None:
            samples: list[list[float]] = []
            ms = paired_medians([model_timer(gm, example, runtime)], reps=self.reps, samples=samples)[0]
            cache.put(key, ms, Sampling.of(samples, runtime.threads))
        return cache.get(key)

    def candidates(self, gm: fx.GraphModule, site: ConvSite) -> list[LayerPlan]:
        """The layer's forms over the rank grid, each with fewer weights than the dense layer and ranks at or
        above its floor (a head's outputs, a stem's input channels)."""
        g, out = site.geometry, []
        dense_params, floor = conv_cost(g).params, rank_floor(gm, site)
        for form in self.forms.split("|"):
            decomp = PLANNABLE[form]
            if site.kind not in FORMS[form][1].kinds or first_failure(site, decomp):
                continue
            order = "channel-major" if DECOMPOSITIONS[decomp].matrix else None
            # where calibrate collected the layer's inputs, factors (and errors) fit the layer's output
            fit = "activation" if DECOMPOSITIONS[decomp].data_aware and site.name in state_of(gm).calibration \
                else None
            for ranks in DECOMPOSITIONS[decomp].rank_grid(g, self.steps, self._rank):
                entry = LayerPlan(decomp, ranks, form, order=order, fit=fit)
                if entry.cost(g).params < dense_params and keeps_floor(ranks, floor, g) and entry not in out:
                    out.append(entry)
        return out

    def _rank(self, r: float, top: int) -> int:
        step = self.round_to or (8 if self.device == "cuda" else 1)  # GPU kernels like multiples of 8
        return min(top, max(step, round(r / step) * step))

    @staticmethod
    def errors(gm: fx.GraphModule, site: ConvSite, entries: list[LayerPlan]) -> list[float]:
        """Each entry's relative error, computed per decomposition in one go: of the layer's output on its
        calibration inputs for entries with fit=activation, else of its kernel."""
        weight, errors = site.weight(gm), {}
        stats = state_of(gm).calibration.get(site.name)
        for decomp in {e.decomp for e in entries}:
            mine = [e for e in entries if e.decomp == decomp]
            errors.update(zip(mine, DECOMPOSITIONS[decomp].errors(weight, mine, stats)))
        return [errors[e] for e in entries]

    @staticmethod
    def busy_timings(cache: LatencyCache) -> dict:
        """A warning, and `trustworthy: False` with the problems for the report, when the timings this run
        took were taken on a busy machine (they are measured again next time, see LatencyCache)."""
        busy = [Sampling.from_json(e) for e in cache.measured.values() if Sampling.from_json(e).busy]
        if not busy:
            return {}
        worst = max(busy, key=lambda s: s.load)
        log.warning("warning: plan-latency timed %d of %d candidates and models on a busy machine (%s); the plan and "
                    "its prediction may be off: plan again on a quiet machine (those timings are measured again)",
                    len(busy), len(cache.measured), "; ".join(worst.problems()))
        return {"trustworthy": False, "problems": worst.problems()}

    def check_plan(self, gm, sites, options, picks, model_ms, runtime, cache, ctx) -> tuple | None:
        """The plan lowered by the pipeline's own later passes and timed whole against the dense model (the
        layers timed alone may save more than the model does). A speedup target the lowered plan misses by
        more than 5% is planned again for a larger saving, in proportion to the shortfall, up to
        CHECK_ROUNDS times. Returns (picks, the measured ms of the plan, a record of the rounds), or None
        when the pipeline has no later lowering pass to lower a copy with."""
        later = [s for s in (ctx.stages if ctx else []) if isinstance(s, Lowering)]
        if not later:
            return None
        speedup, rounds = self.speedup, []
        for _ in range(CHECK_ROUNDS):
            predicted = _predicted_ms(model_ms, options, picks)
            measured = self.planned_ms(gm, sites, options, picks, model_ms, runtime, cache, later, ctx)
            rounds.append({"asked_speedup": speedup, "layers_predicted_ms": predicted, "measured_ms": measured})
            if not self.speedup or model_ms / measured >= SHORT * self.speedup:
                break
            realised = (model_ms - measured) / max(model_ms - predicted, 1e-9)  # the share of the saving kept
            needed = model_ms * (1 - 1 / self.speedup) / max(realised, 1e-9)
            if realised <= 0 or needed >= model_ms:
                break
            speedup = model_ms / (model_ms - needed)
            try:
                picks = self.solve(sites, options, model_ms, speedup)
            except RankError:
                break  # decide() refuses the target, with what the plan reached
        if rounds[-1]["asked_speedup"] != speedup:  # planned again, not yet timed
            measured = self.planned_ms(gm, sites, options, picks, model_ms, runtime, cache, later, ctx)
            rounds.append({"asked_speedup": speedup, "measured_ms": measured})
        return picks, measured, rounds

    def planned_ms(self, gm, sites, options, picks, model_ms, runtime, cache, later, ctx) -> float:
        """The whole model's latency with `picks` lowered (a copy, by the later lowering passes), from the
        cache or timed now, paired with the dense model."""
        copied = copy.deepcopy(gm)
        plan = state_of(copied).plan
        for site, opts, i in zip(sites, options, picks):
            plan.set(site.name, opts[i].entry or DENSE)
        lowered = Pipeline(later).run(copied, RunContext(ctx.train_data, ctx.eval_data, progress=False))
        example = state_of(gm).example_inputs
        key = f"{runtime.key()}|plan-of|{model_key(gm, example)}|{model_key(lowered, example)}"
        if cache.get(key) is None:
            samples: list[list[float]] = []
            dense_ms, lowered_ms = paired_medians([model_timer(gm, example, runtime),
                                                   model_timer(lowered, example, runtime)],
                                                  reps=self.reps, samples=samples)
            cache.put(key, model_ms * lowered_ms / dense_ms, Sampling.of(samples, runtime.threads))
        return cache.get(key)

    def solve(self, sites: list[ConvSite], options: list[list[Option]], model_ms: float,
              speedup: float | None = None) -> list[int]:
        """Indices into each layer's options: the least summed squared error within the budget (`speedup`:
        a speedup target other than the pass's own)."""
        speedup = speedup or self.speedup
        def weight(site, entry, ms):
            if self.speedup:
                return ms
            cost = entry.cost(site.geometry) if entry else conv_cost(site.geometry)
            return cost.params if self.ratio else cost.macs

        groups = [[(weight(s, c.entry, c.ms), c.kl if self.objective == "eval" else c.error ** 2) for c in o]
                  for s, o in zip(sites, options)]
        dense = sum(g[0][0] for g in groups)
        if self.speedup:
            if dense > 1.5 * model_ms and speedup == self.speedup:
                log.warning("plan-latency: the layers timed alone take %.3f ms, far more than the whole model "
                            "(%.3f ms); the machine may be busy, and predictions will be off", dense, model_ms)
            budget = dense - model_ms * (1 - 1 / speedup)  # the layers must save model_ms (1 - 1/S)
            what = f"speedup {self.speedup:g}"
        else:
            budget = dense / (self.ratio or self.macs)
            what = f"ratio {self.ratio:g}" if self.ratio else f"macs {self.macs:g}"
        try:
            return knapsack.choose(groups, budget)
        except knapsack.Unreachable as e:
            if self.speedup:
                saved = dense - e.least
                best = model_ms / (model_ms - saved) if saved < model_ms else float("inf")
                raise RankError(f"plan-latency: {what} is out of reach in {self.runtime}/{self.device}: the fastest "
                                f"candidates give {short_of(best, self.speedup)} (they save {saved:.3f} of the model's "
                                f"{model_ms:.3f} ms); {self.cap(sites, options, model_ms)}; ask for less, or add forms or a finer "
                                "rank grid (steps=)") from None
            raise RankError(f"plan-latency: {what} is out of reach with candidates that are not slower than "
                            f"dense (at most {dense / e.least:.2f}x)") from None

    @staticmethod
    def cap(sites: list[ConvSite], options: list[list[Option]], model_ms: float) -> str:
        """What caps the speedup: the share of the model's time outside the layers some form makes faster
        (layers no form can compress, such as depthwise convs, and normalisation, activations, attention's
        matmuls), and the speedup if those layers took no time at all."""
        compressible = sum(opts[0].ms for opts in options if len(opts) > 1)
        stuck = [s.name for s, opts in zip(sites, options) if len(opts) == 1]
        share = min(1.0, max(0.0, 1 - compressible / model_ms))
        best = "no limit" if share == 0 else f"{1 / share:.2f}x"
        layers = f"{len(stuck)} layer{'s' * (len(stuck) != 1)} no form speeds up" + (
            f": {name_list(stuck, 3)}" if stuck else "")
        return (f"{share:.0%} of the model's time is outside the layers some form makes faster ({layers}, and the "
                f"operations between layers), so even compressed layers that took no time would give at most {best}")

    def fastest_within_drop(self, gm: fx.GraphModule, sites: list[ConvSite], options: list[list[Option]],
                            batches: list, baseline: float) -> tuple[list[int], float]:
        """The picks with the least summed latency whose accuracy on `batches`, every chosen layer approximated
        at once, is at most max_drop below `baseline`, and that drop. Each try minimises the latency under a
        budget on the summed divergences (each candidate measured alone; one whose accuracy drop alone exceeds
        max_drop is left out): first the fastest plan, then the plan of candidates that leave the output as it
        was, then the budget is bisected on the measured drop, geometrically, since divergences span
        magnitudes."""
        groups = [[(c.kl, c.ms) if c.drop <= self.max_drop else (math.inf, c.ms) for c in o] for o in options]
        latency = lambda picks: sum(o[i].ms for o, i in zip(options, picks))  # noqa: E731

        def drop_of(picks: list[int]) -> float:
            with approximated(gm, [(s, o[i].entry) for s, o, i in zip(sites, options, picks) if i]):
                return baseline - accuracy(gm, batches)

        best, best_drop = [0] * len(options), 0.0  # all dense
        # twice the largest sum: the knapsack rounds each weight up, and the fastest plan must still fit
        low, high = 0.0, 2 * sum(max((w for w, _ in g if w < math.inf), default=0.0) for g in groups)
        for budget in [high, 0.0] + [None] * BISECTIONS:
            budget = math.sqrt(max(low, high * 1e-6) * high) if budget is None else budget
            picks = knapsack.choose(groups, budget)
            drop = drop_of(picks)
            if drop <= self.max_drop + 1e-12:
                if latency(picks) < latency(best):
                    best, best_drop = picks, drop
                low = budget
            else:
                high = budget
            if low == high or high == 0:  # the fastest plan fits, or not even the free candidates do
                break
        if not any(best):
            alone = [c.drop for o in options for c in o[1:]]
            least = (f"the least any one candidate loses alone is {min(alone):.2%}" if alone else
                     "no layer has a form faster than dense")
            raise RankError(f"plan-latency: max_drop {self.max_drop:g} is out of reach: every plan tried lost more "
                            f"on the {sum(len(y) for _, y in batches)} samples of eval_data() it measures on "
                            f"({least}); allow a larger drop, or measure on more batches (eval_batches=)")
        return best, best_drop


def _predicted_ms(model_ms: float, options: list[list[Option]], picks: list[int]) -> float:
    """The model's time less each layer's saving measured alone (dense minus the picked form)."""
    return model_ms - sum(o[0].ms - o[i].ms for o, i in zip(options, picks))


@contextmanager
def approximated(gm: fx.GraphModule, layers: list[tuple[ConvSite, LayerPlan]]):
    """Each layer's weight replaced by its plan entry's approximation for the duration, then restored."""
    weights = [site.weight(gm) for site, _ in layers]
    kept = [w.detach().clone() for w in weights]
    calibration = state_of(gm).calibration
    with torch.no_grad():
        try:
            for w, k, (site, entry) in zip(weights, kept, layers):
                w.copy_(entry.reconstruct(k, calibration.get(site.name)))
            yield
        finally:
            for w, k in zip(weights, kept):
                w.copy_(k)


def alone_costs(gm: fx.GraphModule, site: ConvSite, entries: list[LayerPlan], batches: list,
                baseline: tuple[float, list[torch.Tensor]]) -> list[tuple[float, float]]:
    """For each entry, when this layer alone takes its approximation: the accuracy the model loses on
    `batches` (not below zero), and the mean KL divergence of its softmax output from the dense model's.
    Only the part of the model that depends on the layer runs again for each entry."""
    dense_accuracy, dense_scores = baseline
    weight, suffix = site.weight(gm), Suffix(gm, site.weight_name)
    kept = weight.detach().clone()
    stats = state_of(gm).calibration.get(site.name)
    approximations = [entry.reconstruct(kept, stats) for entry in entries]
    correct, kl = [0] * len(entries), [0.0] * len(entries)
    with in_mode(gm, training=False), torch.no_grad():
        try:
            for (x, y), dense in zip(batches, dense_scores):
                inputs = suffix.inputs(x)
                for i, approximation in enumerate(approximations):
                    weight.copy_(approximation)
                    s = class_scores(suffix(x, inputs)).float()
                    correct[i] += int((s.argmax(1) == y).sum())
                    kl[i] += float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(dense, 1), log_target=True,
                                            reduction="sum"))
        finally:
            weight.copy_(kept)
    seen = sum(len(y) for _, y in batches)
    return [(max(dense_accuracy - c / seen, 0.0), max(k / seen, 0.0)) for c, k in zip(correct, kl)]


def scores(gm: fx.GraphModule, batches: list) -> list[torch.Tensor]:
    """The model's class scores on each batch, in eval mode and float32 (no autograd graph kept)."""
    with in_mode(gm, training=False), torch.no_grad():
        return [class_scores(gm(x)).float() for x, _ in batches]
