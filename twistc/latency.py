"""Measured latency of layers and models in the runtime a user deploys to.

A candidate is a layer's dense form (Conv2d, Conv1d or Linear) or one of its lowered forms (a
LayerPlan), built by its form's row (twistc.decomp.FORMS) from random factors at the layer's
real input shape. The candidates of one layer are timed together, round-robin (one run of each per
repetition, after warm-up), so machine noise hits all of them alike; the median is kept. Medians go
to a cache keyed by the runtime, its settings and the machine, the layer's shapes and conv
parameters, the form and the ranks, so a second compile measures nothing new.

Runtimes: `ort` (onnxruntime, provider cpu or cuda; each candidate is exported to a small ONNX
model; thread spinning is off, since sessions timed round-robin would otherwise steal each other's
cores), `torch` (PyTorch eager on cpu or cuda; CUDA timings use events) and `torch-compile`
(torch.compile with static shapes; on CUDA with CUDA graphs).
"""
from __future__ import annotations

import copy
import hashlib
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from twistc.errors import SpecError, TwistcError, first_line
from twistc.export import batched, for_onnxruntime, onnx_model
from twistc.latency_cache import LatencyCache
from twistc.decomp import FORMS
from twistc.decomp.cost import ConvGeometry
from twistc.plan import LayerPlan
from twistc.machine import cpu_model
from twistc.timing import Sampling

log = logging.getLogger(__name__)

RUNTIMES = {"ort": ("cpu", "cuda"), "torch": ("cpu", "cuda"), "torch-compile": ("cpu", "cuda")}


@dataclass(frozen=True)
class Runtime:
    """Where latency is measured: the runtime, its device (ort: execution provider), threads and batch."""

    runtime: str = "ort"
    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    channels_last: bool = False  # torch runtimes: 4-D weights and inputs in NHWC memory order

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise SpecError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.device not in RUNTIMES[self.runtime]:
            raise SpecError(f"device must be one of {', '.join(RUNTIMES[self.runtime])}, got {self.device!r}")
        if self.threads < 1 or self.batch < 1:
            raise SpecError(f"threads and batch must be >= 1, got threads={self.threads}, batch={self.batch}")
        if self.channels_last and self.runtime == "ort":
            raise SpecError("channels_last applies to runtime torch and torch-compile; onnxruntime picks its own "
                            "memory layout")

    def machine(self) -> str:
        if self.device == "cuda":
            return torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (unavailable)"
        return cpu_model()

    def key(self) -> str:
        version = _ort().__version__ if self.runtime == "ort" else torch.__version__
        spin = "|spin=0" if self.runtime == "ort" else ""
        return (f"{self.runtime}-{version}|{self.device}|{self.machine()}|threads={self.threads}"
                f"|batch={self.batch}{spin}" + ("|channels_last" if self.channels_last else ""))

    def to_json(self) -> dict:
        return {**asdict(self), "machine": self.machine()}

    def timer(self, module: nn.Module, example: torch.Tensor | tuple) -> Callable[[], float]:
        """A function that runs `module` once on `example` (an input, or a tuple of them) in this runtime
        and returns the seconds taken."""
        inputs = _as_inputs(example)
        try:
            module = module.eval()
        except NotImplementedError:  # a torch.export program's module: exported in eval mode already
            pass
        if self.runtime == "ort":  # bfloat16, float64: as the float32 copy they are exported as
            return ort_timer(*for_onnxruntime(module, inputs), self.device, self.threads)
        if self.device != "cpu" or self.channels_last:  # a copy: the caller's module stays as it is
            module = copy.deepcopy(module).to(self.device)
        inputs = tuple(x.to(self.device) for x in inputs)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
            inputs = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs)
        run = _compiled(module, self.device) if self.runtime == "torch-compile" else module
        return torch_timer(run, inputs, self.device, self.threads)


def _ort():
    import onnxruntime
    return onnxruntime


def _compiled(module: nn.Module, device: str) -> Callable:
    """torch.compile for timing: static shapes, CUDA graphs on CUDA (mode reduce-overhead). The candidates
    of every layer share nn.Conv2d.forward's code, so dynamo's recompile limit is raised, and reaching it
    fails loudly instead of timing eager code. A module that does not compile is a clear error."""
    import torch._dynamo.config as dynamo

    for limit in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(getattr(dynamo, limit), 1 << 16))
    dynamo.fail_on_recompile_limit_hit = True
    compiled = torch.compile(module, dynamic=False, mode="reduce-overhead" if device == "cuda" else None)
    first = True

    def call(x):
        nonlocal first
        if not first:
            return compiled(x)
        first = False
        try:
            return compiled(x)
        except Exception as e:
            raise TwistcError(f"torch.compile cannot compile {type(module).__name__}: "
                              f"{first_line(e)}; "
                              "measure in runtime torch (eager) instead") from None

    return call


def _as_inputs(example: torch.Tensor | tuple) -> tuple:
    return example if isinstance(example, tuple) else (example,)


def torch_timer(module: Callable, inputs: tuple, device: str, threads: int) -> Callable[[], float]:
    """A function that runs `module` once on `inputs` and returns the seconds taken (CUDA: by events)."""
    @torch.inference_mode()
    def run() -> float:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                module(*inputs)
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1e3
            t = time.perf_counter()
            module(*inputs)
            return time.perf_counter() - t
        finally:
            torch.set_num_threads(previous)

    return run


def onnx_bytes(module: nn.Module, example: torch.Tensor | tuple) -> bytes:
    """A small ONNX model of `module` at the fixed shapes of `example`, by the exporter twistc writes files with."""
    return onnx_model(module.eval(), _as_inputs(example), dynamic_batch=False)


ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def ort_session(model: bytes | str, device: str = "cpu", threads: int = 1, spin: bool = False):
    """An onnxruntime session on `device` with `threads` intra-op threads. Spinning is off unless asked:
    models timed round-robin would otherwise compete with each other's idle spinning threads."""
    ort = _ort()
    provider = ORT_PROVIDERS[device]
    if provider not in ort.get_available_providers():
        raise TwistcError(f"onnxruntime here has no {provider}; measure with the torch runtime, or replace "
                          "onnxruntime by onnxruntime-gpu (see README)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(model, options, providers=[provider])


def ort_timer(module: nn.Module, example: torch.Tensor | tuple, device: str, threads: int,
              model: bytes | str | None = None) -> Callable[[], float]:
    inputs = _as_inputs(example)
    session = ort_session(model or onnx_bytes(module, inputs), device, threads)
    return session_timer(session, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


def session_timer(session, feed: dict) -> Callable[[], float]:
    """A function that runs an onnxruntime session once on `feed` and returns the seconds taken: the one
    onnxruntime timer of latency planning, the compile's check and `twistc bench`."""
    def run() -> float:
        t = time.perf_counter()
        session.run(None, feed)
        return time.perf_counter() - t

    return run


def paired_medians(timers: list[Callable[[], float]], warmup: int = 5, reps: int = 25,
                   samples: list[list[float]] | None = None) -> list[float]:
    """Round-robin timing: each repetition runs every timer once. Medians in milliseconds; the raw
    samples are appended to `samples` when it is given."""
    for _ in range(warmup):
        for run in timers:
            run()
    times = [[] for _ in timers]
    for _ in range(reps):
        for i, run in enumerate(timers):
            times[i].append(run() * 1e3)
    if samples is not None:
        samples.extend(times)
    return [statistics.median(t) for t in times]


def layer_key(g: ConvGeometry, dtype: torch.dtype) -> str:
    """What a layer's latency depends on: its geometry (kind, kernel shape, sampling, input shape) and dtype."""
    dtype = "" if dtype == torch.float32 else f",dtype={str(dtype).removeprefix('torch.')}"
    if g.kind == "Linear":
        return f"linear={g.out_channels}x{g.in_channels},tokens={g.in_hw[0]}{dtype}"
    pad = g.padding if isinstance(g.padding, str) else "x".join(map(str, g.padding))
    kind = "" if g.kind == "Conv2d" else f",kind={g.kind}"
    return (f"conv={g.out_channels}x{g.in_channels // g.groups}x{g.kernel[0]}x{g.kernel[1]}"
            f",in={g.in_channels}x{g.in_hw[0]}x{g.in_hw[1]},stride={'x'.join(map(str, g.stride))}"
            f",pad={pad},dil={'x'.join(map(str, g.dilation))},groups={g.groups},mode={g.padding_mode}{kind}{dtype}")


def layer_input(g: ConvGeometry, batch: int, dtype: torch.dtype) -> torch.Tensor:
    shape = {"Linear": (batch, g.in_hw[0], g.in_channels),
             "Conv1d": (batch, g.in_channels, g.in_hw[0])}.get(g.kind, (batch, g.in_channels, *g.in_hw))
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def candidate_key(entry: LayerPlan | None) -> str:
    if entry is None:
        return "dense"
    return f"{entry.lowering}:{'x'.join(map(str, entry.ranks))}" + (f":{entry.order}" if entry.order else "")


def build(g: ConvGeometry, entry: LayerPlan | None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The layer as it runs after lowering, in the model's dtype, with random weights (latency does not
    depend on values). Every form carries a bias, as a conv does once BatchNorm is folded into it."""
    if entry is None:
        if g.kind == "Linear":
            return nn.Linear(g.in_channels, g.out_channels).to(dtype)
        conv = nn.Conv1d if g.one_d else nn.Conv2d
        return conv(g.in_channels, g.out_channels, g.spatial_kernel, groups=g.groups, **g.conv_args()).to(dtype)
    generator = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=generator) * 0.1  # noqa: E731
    decomposition, form = FORMS[entry.lowering]
    module, _ = form.build(g, decomposition.random_factors(g, entry, rand), rand(g.out_channels), form.method_for(None))
    return module.to(dtype)


def measure_layer(g: ConvGeometry, entries: list[LayerPlan | None], runtime: Runtime, cache: LatencyCache,
                  warmup: int = 5, reps: int = 25, dtype: torch.dtype = torch.float32) -> list[float]:
    """Latency (ms) of each candidate (None: the dense layer), from the cache or measured now.

    The dense layer is always timed with the candidates it is compared with, and so is an identity on
    the same input: its median (the runtime's per-call cost: feeding, launching, returning) is
    subtracted, so that a layer's number is closer to what it adds inside a whole model."""
    keys = [f"{runtime.key()}|{layer_key(g, dtype)}|{candidate_key(e)}" for e in entries]
    missing = [i for i, k in enumerate(keys) if cache.get(k) is None]
    if missing:
        dense = next((i for i, e in enumerate(entries) if e is None), None)
        timed = sorted(set(missing) | ({dense} if dense is not None else set()))
        x = layer_input(g, runtime.batch, dtype)
        timers = [runtime.timer(nn.Identity(), x)] + [runtime.timer(build(g, entries[i], dtype), x) for i in timed]
        samples: list[list[float]] = []
        null, *medians = paired_medians(timers, warmup, reps, samples)
        sampling = Sampling.of(samples[1:], runtime.threads)  # the candidates' ratios to the first of them
        for i, ms in zip(timed, medians):
            cache.put(keys[i], max(ms - null, 1e-6), sampling)
    return [cache.get(k) for k in keys]


def model_timer(module: nn.Module, example: torch.Tensor | tuple, runtime: Runtime,
                onnx_path: str | Path | None = None) -> Callable[[], float]:
    """A timer for a whole model on `example` (its inputs) at the runtime's batch: its ONNX file in
    onnxruntime (exported here when no path is given), or the module itself under runtime torch or
    torch-compile."""
    inputs = batched(_as_inputs(example), runtime.batch)
    if runtime.runtime != "ort" or onnx_path is None:
        return runtime.timer(module, inputs)
    _, inputs = for_onnxruntime(module, inputs)  # the file is the float32 copy of a bfloat16 or float64 model
    return ort_timer(module, inputs, runtime.device, runtime.threads, str(onnx_path))


def model_key(module: nn.Module, example: torch.Tensor | tuple) -> str:
    """A whole model's cache key: a digest of its modules (with their settings), its graph code where it
    has one, and the inputs' shapes and dtypes; weights' values do not change a dense model's time."""
    shapes = [(tuple(x.shape), str(x.dtype)) if torch.is_tensor(x) else repr(x) for x in _as_inputs(example)]
    text = f"{module}\n{getattr(module, 'code', '')}\n{shapes}"
    return f"model={hashlib.sha256(text.encode()).hexdigest()[:16]}"


def paired_speedup(base: list[float], other: list[float], seed: int = 0) -> tuple[float, list[float]]:
    """median(base) / median(other), the speedup the two medians show, and a 95% interval of it from a
    bootstrap that resamples repetitions with their pairs kept together."""
    base, other = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(base), size=(2000, len(base)))
    boot = np.median(base[idx], axis=1) / np.median(other[idx], axis=1)
    return float(np.median(base) / np.median(other)), [float(np.percentile(boot, 2.5)),
                                                       float(np.percentile(boot, 97.5))]


def compare_models(timers: list[Callable[[], float]], warmup: int = 5, reps: int = 30, threads: int = 1) -> dict:
    """Paired timing of whole models: medians, the raw samples, each model's speedup over the first, and
    how far to trust them (timing.Sampling). Unsteady samples are measured again, three times as long,
    once; if they stay unsteady, `trustworthy` is False and `problems` says why."""
    samples: list[list[float]] = []
    medians = paired_medians(timers, warmup, reps, samples)
    sampling = Sampling.of(samples, threads)
    if not sampling.trustworthy:
        reps, samples = reps * 3, []
        medians = paired_medians(timers, 0, reps, samples)
        sampling = Sampling.of(samples, threads)
    out = {"median_ms": medians, "samples_ms": samples, "reps": reps, "sampling": sampling.to_json(),
           "trustworthy": sampling.trustworthy, "problems": sampling.problems()}
    out["speedups"] = [paired_speedup(samples[0], s) for s in samples]
    if len(timers) > 1:
        out["speedup"], out["speedup_ci95"] = out["speedups"][1]
    return out
