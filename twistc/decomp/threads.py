"""How many threads decompositions get.

A decomposition is many small float64 eigh and matmul calls. On cores that other processes keep busy,
several threads wait on each other and run slower than one: HOOI of ResNet-50's 3x3 kernels took
8.5 s on 2 threads and 6.5 s on 1 beside two busy processes, against 2.5 s and 4.4 s on a quiet
2-core machine (tools/compile_time.py, results/compile_time). So decompositions run on the cores that
other work leaves free, at least one and at most torch's thread count. Other work is the 1-minute load
average less this process's own share of it (its CPU time, weighted as the load average weighs it).
"""
from __future__ import annotations

import contextlib
import math
import os
import time

import torch

_STARTED = time.monotonic(), time.process_time()


def own_load() -> float:
    """This process's contribution to the 1-minute load average, estimated from its CPU time so far."""
    elapsed = time.monotonic() - _STARTED[0]
    rate = (time.process_time() - _STARTED[1]) / max(elapsed, 1e-9)
    return rate * (1 - math.exp(-elapsed / 60))


def free_cores() -> int:
    """torch's thread count, lowered to the cores other processes leave free."""
    threads = torch.get_num_threads()
    try:
        others = max(os.getloadavg()[0] - own_load(), 0.0)
    except (AttributeError, OSError):  # no load average on this platform
        return threads
    return max(1, min(threads, math.floor((os.cpu_count() or 1) - others + 0.5)))


@contextlib.contextmanager
def on_free_cores():
    previous = torch.get_num_threads()
    torch.set_num_threads(free_cores())
    try:
        yield
    finally:
        torch.set_num_threads(previous)
