"""Timing that says how far it can be trusted: injected sample streams, never the machine's own speed."""
import itertools

import pytest

from twistc import timing
from twistc.latency import compare_models, paired_speedup
from twistc.timing import Sampling


def _stream(values):
    """A timer returning `values` (ms) in turn, as seconds."""
    it = itertools.cycle(values)
    return lambda: next(it) / 1e3


def test_a_steady_stream_is_trusted_and_its_speedup_is_the_ratio_of_medians():
    out = compare_models([_stream([2.0, 2.02, 1.98]), _stream([1.0, 1.01, 0.99])], warmup=1, reps=30)
    assert out["trustworthy"] and out["reps"] == 30 and not out["problems"]
    assert out["speedup"] == pytest.approx(out["median_ms"][0] / out["median_ms"][1])
    lo, hi = out["speedup_ci95"]
    assert lo <= out["speedup"] <= hi


def test_an_unsteady_stream_is_measured_longer_then_flagged():
    # every few repetitions a burst of other work makes the compiled model 9x slower: pairing cannot cancel it
    base, jumpy = _stream([18.0, 2.0, 18.0, 2.0, 2.0]), _stream([1.6, 1.6, 14.0, 1.6, 14.0, 1.6, 1.6])
    out = compare_models([base, jumpy], warmup=0, reps=20)
    assert out["reps"] == 60 and not out["trustworthy"]
    assert any("spread" in p for p in out["problems"])


def test_a_busy_machine_is_flagged_even_when_the_samples_look_steady(monkeypatch):
    monkeypatch.setattr(timing, "load", lambda: 4.0)
    monkeypatch.setattr(timing, "cores", lambda: 2)
    out = compare_models([_stream([2.0]), _stream([1.0])], warmup=0, reps=10, threads=1)
    assert not out["trustworthy"] and out["problems"] == ["load average 4.0 on 2 core(s) with 1 timing thread(s)"]


def test_sampling_flags_spread_drift_and_load():
    steady = [[1.0] * 20, [0.5 + 0.001 * (i % 3) for i in range(20)]]
    assert Sampling.of(steady, threads=1, load_avg=0.5).trustworthy
    jumpy = [[1.0] * 20, [0.2 + (i % 4) for i in range(20)]]
    assert any("spread" in p for p in Sampling.of(jumpy, load_avg=0.0).problems())
    drifting = [[1.0] * 20, [0.5] * 10 + [0.8] * 10]
    assert any("drifted" in p for p in Sampling.of(drifting, load_avg=0.0).problems())
    assert timing.busy(3.2, 2, 1) and not timing.busy(1.9, 2, 1) and not timing.busy(2.4, 2, 2)


def test_paired_speedup_keeps_pairs_together():
    base = [2.0, 4.0, 2.0, 4.0, 2.0, 4.0]
    other = [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]  # exactly half of its pair each time
    speedup, (lo, hi) = paired_speedup(base, other)
    assert speedup == lo == hi == 2.0
