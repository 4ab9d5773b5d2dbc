"""Latency of ONNX models in onnxruntime, or of torch.export programs in PyTorch, measured side by side in
one process.

Models are timed round-robin (one run of each per repetition) after warm-up, so that machine
noise hits all of them alike; medians and their ratios to the first model are reported.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from twistc.errors import TwistcError, first_line
from twistc.export import batched
from twistc.latency import ORT_PROVIDERS, Runtime, compare_models, ort_session, session_timer
from twistc.machine import cpu_model, versions

# an ONNX input's type -> the numpy dtype twistc bench feeds it
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def resolve_provider(provider: str) -> str:
    """'auto' is cuda when this onnxruntime has the CUDA execution provider (onnxruntime-gpu), else cpu."""
    if provider == "auto":
        return "cuda" if ORT_PROVIDERS["cuda"] in ort.get_available_providers() else "cpu"
    return provider


def session(path: str | Path, provider: str = "cpu", threads: int = 1, spin: bool = False) -> ort.InferenceSession:
    if provider not in ORT_PROVIDERS:
        raise TwistcError(f"unknown provider {provider!r} (choose {', '.join(ORT_PROVIDERS)})")
    if not Path(path).is_file():
        raise TwistcError(f"ONNX file {path} does not exist")
    try:
        return ort_session(str(path), provider, threads, spin)
    except TwistcError:
        raise
    except Exception as e:
        raise TwistcError(f"onnxruntime cannot load {path}: {first_line(e)}") from None


def _feed(sess: ort.InferenceSession, batch: int, rng: np.random.Generator) -> dict:
    """Inputs of the session's shapes at `batch`: Gaussian noise for floating-point inputs, zeros (a
    valid index) for integer ones, such as token ids."""
    feed = {}
    for inp in sess.get_inputs():
        shape = [batch if i == 0 else d for i, d in enumerate(inp.shape)]
        if not all(isinstance(d, int) for d in shape):
            raise TwistcError(f"input {inp.name} has a dynamic axis besides the batch: {inp.shape}")
        dtype = ORT_TYPES.get(inp.type)
        if dtype is None:
            raise TwistcError(f"input {inp.name} is a {inp.type}; twistc bench feeds float and integer tensors")
        noise = rng.standard_normal(shape) if np.issubdtype(dtype, np.floating) else np.zeros(shape)
        feed[inp.name] = noise.astype(dtype)
    return feed


def _ort_timer(path: str, provider: str, threads: int, spin: bool, batch: int, rng) -> Callable[[], float]:
    sess = session(path, provider, threads, spin)
    return session_timer(sess, _feed(sess, batch, rng))


def _program_timer(path: str, runtime: Runtime) -> Callable[[], float]:
    """A timer of a torch.export program (.pt2) in PyTorch eager, on runtime.device."""
    if not Path(path).is_file():
        raise TwistcError(f"program file {path} does not exist")
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise TwistcError(f"torch.export cannot load {path}: {first_line(e)}") from None
    inputs, _ = program.example_inputs
    return runtime.timer(program.module(), batched(inputs, runtime.batch))


def bench(paths: list[str], batch: int = 1, threads: int = 1, provider: str = "cpu", warmup: int = 10,
          reps: int = 50, seed: int = 0, spin: bool = False, runtime: str = "ort") -> dict:
    """Round-robin timing of ONNX files in onnxruntime (`runtime="ort"`, on `provider`) or of torch.export
    programs (.pt2) in PyTorch (`runtime="torch"`, on `provider` as device, CUDA timed with events):
    medians, the raw samples, and each model's speedup over the first, the median of the paired
    per-repetition ratios with a bootstrap 95% interval."""
    rng = np.random.default_rng(seed)
    if runtime != "ort":
        device = provider if provider != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise TwistcError("this torch sees no CUDA device; bench on <option:provider>")
        target = Runtime(runtime, device, threads, batch)
        timers = [_program_timer(p, target) for p in paths]
        provider, machine = target.device, target.machine()
    else:
        provider = resolve_provider(provider)
        timers = [_ort_timer(p, provider, threads, spin, batch, rng) for p in paths]
        machine = cpu_model()
    timed = compare_models(timers, warmup, reps, threads)
    models = []
    for path, t, (speedup, ci) in zip(paths, timed["samples_ms"], timed["speedups"]):
        q = statistics.quantiles(t, n=10) if len(t) > 1 else [t[0]] * 9
        models.append({"path": str(path), "median_ms": statistics.median(t), "p10_ms": q[0], "p90_ms": q[-1],
                       "min_ms": min(t), "speedup_vs_first": speedup, "speedup_ci95": ci, "samples_ms": t})
    return {"models": models, "runtime": runtime, "batch": batch, "threads": threads, "provider": provider,
            "spinning": spin if runtime == "ort" else None, "warmup": warmup, "repetitions": timed["reps"],
            "trustworthy": timed["trustworthy"], "problems": timed["problems"], "sampling": timed["sampling"],
            "machine": machine, "versions": versions()}
