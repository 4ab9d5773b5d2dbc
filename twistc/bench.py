"""Latency of ONNX models in onnxruntime, measured side by side in one process.

Models are timed round-robin (one run of each per repetition) after warm-up, so that machine
noise hits all of them alike; medians and their ratios to the first model are reported.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from twistc.errors import TwistcError
from twistc.report import cpu_model, versions

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_provider(provider: str) -> str:
    """'auto' is cuda when this onnxruntime has the CUDA execution provider (onnxruntime-gpu), else cpu."""
    if provider == "auto":
        return "cuda" if PROVIDERS["cuda"] in ort.get_available_providers() else "cpu"
    return provider


def session(path: str | Path, provider: str = "cpu", threads: int = 1, spin: bool = False) -> ort.InferenceSession:
    if provider not in PROVIDERS:
        raise TwistcError(f"unknown provider {provider!r} (choose {', '.join(PROVIDERS)})")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise TwistcError(f"onnxruntime here has no {name}; for cuda, replace onnxruntime by onnxruntime-gpu "
                          "(see README)")
    if not Path(path).is_file():
        raise TwistcError(f"ONNX file {path} does not exist")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        return ort.InferenceSession(str(path), options, providers=[name])
    except Exception as e:
        raise TwistcError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None


def _feed(sess: ort.InferenceSession, batch: int, rng: np.random.Generator) -> dict:
    feed = {}
    for inp in sess.get_inputs():
        shape = [batch if i == 0 else d for i, d in enumerate(inp.shape)]
        if not all(isinstance(d, int) for d in shape):
            raise TwistcError(f"input {inp.name} has a dynamic axis besides the batch: {inp.shape}")
        feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def bench(paths: list[str], batch: int = 1, threads: int = 1, provider: str = "cpu", warmup: int = 10,
          reps: int = 50, seed: int = 0, spin: bool = False) -> dict:
    """Medians, the raw samples, and each model's speedup over the first: the median of the paired
    per-repetition ratios, with a bootstrap 95% interval."""
    rng = np.random.default_rng(seed)
    provider = resolve_provider(provider)
    sessions = [session(p, provider, threads, spin) for p in paths]
    feeds = [_feed(s, batch, rng) for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    times = [[] for _ in paths]
    for _ in range(reps):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - start) * 1e3)
    models = []
    for path, t in zip(paths, times):
        q = statistics.quantiles(t, n=10) if len(t) > 1 else [t[0]] * 9
        models.append({"path": str(path), "median_ms": statistics.median(t), "p10_ms": q[0], "p90_ms": q[-1],
                       "min_ms": min(t), "samples_ms": t})
    base = models[0]["median_ms"]
    for m, t in zip(models, times):
        ratios = np.array(times[0]) / np.array(t)
        boot = np.median(rng.choice(ratios, size=(2000, len(ratios))), axis=1)
        m["ratio_to_first"] = m["median_ms"] / base
        m["speedup_vs_first"] = float(np.median(ratios))
        m["speedup_ci95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return {"models": models, "batch": batch, "threads": threads, "provider": provider, "spinning": spin,
            "warmup": warmup, "repetitions": reps, "machine": cpu_model(), "versions": versions()}
