"""How many threads decompositions get.

A decomposition is many small float64 eigh and matmul calls. On cores that other processes keep busy,
several threads wait on each other and run slower than one: HOOI of ResNet-50's 3x3 kernels took
8.5 s on 2 threads and 6.5 s on 1 beside two busy processes, against 2.5 s and 4.4 s on a quiet
2-core machine (tools/compile_time.py, results/compile_time). So decompositions run on the cores that
other work leaves free, at least one and at most torch's thread count.

Other work is measured where Linux's /proc/stat says how busy all cores were: the cores' busy time
less this process's own CPU time, over the seconds since the last measurement (or since this module
was imported). That is what other processes do now, unlike the 1-minute load average, which still
counts work that stopped a minute ago. Where the window is under a second or there is no /proc/stat,
it is the load average less this process's own share of it.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch

MIN_WINDOW = 1.0  # seconds: a shorter window falls back to the load average


def busy_seconds() -> float | None:
    """The seconds all cores together have been busy since boot (/proc/stat), or None where it is not."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _sample() -> tuple[float, float, float | None]:
    return time.monotonic(), time.process_time(), busy_seconds()


_STARTED = _sample()
_last = _STARTED


def own_load() -> float:
    """This process's contribution to the 1-minute load average, estimated from its CPU time so far."""
    elapsed = time.monotonic() - _STARTED[0]
    rate = (time.process_time() - _STARTED[1]) / max(elapsed, 1e-9)
    return rate * (1 - math.exp(-elapsed / 60))


def others_busy() -> float:
    """The cores other processes keep busy: measured since the last call where /proc/stat allows, else
    the 1-minute load average less this process's share."""
    global _last
    now = _sample()
    wall = now[0] - _last[0]
    if now[2] is not None and _last[2] is not None and wall >= MIN_WINDOW:
        others = (now[2] - _last[2] - (now[1] - _last[1])) / wall
        _last = now
        return max(others, 0.0)
    try:
        return max(os.getloadavg()[0] - own_load(), 0.0)
    except (AttributeError, OSError):  # no load average on this platform
        return 0.0


def free_cores() -> int:
    """torch's thread count, lowered to the cores other processes leave free."""
    threads = torch.get_num_threads()
    return max(1, min(threads, math.floor((os.cpu_count() or 1) - others_busy() + 0.5)))


@contextlib.contextmanager
def on_free_cores():
    previous = torch.get_num_threads()
    torch.set_num_threads(free_cores())
    try:
        yield
    finally:
        torch.set_num_threads(previous)
