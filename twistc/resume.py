"""Stopping and resuming a training run: where it saves, what a checkpoint holds, and SIGINT/SIGTERM
deferred to the end of the optimizer step so that a stopped run resumes exactly.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from twistc import checkpoint, distributed
from twistc.checkpoint import rng_state
from twistc.errors import Stopped

if TYPE_CHECKING:
    from twistc.train import BestWeights, TrainResult

log = logging.getLogger("twistc.train")


@dataclass
class Checkpointing:
    """Where the train loop saves (every epoch end, every `every` optimizer steps when > 0, and on
    SIGINT/SIGTERM), and whether it resumes."""

    directory: Path
    identity: dict  # checkpoint.identity(): the pipeline, model structure and world size
    resume: bool = False
    every: int = 0
    name: str = checkpoint.FILE  # a pipeline's later train stages each keep their own file


@contextmanager
def deferred_stop():
    """SIGINT and SIGTERM set a flag instead of raising, so the loop can stop between steps; a second
    signal raises at once. Yields the list of signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise Stopped(signum)
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def save(cp: Checkpointing, module, optimizer, scaler, result: TrainResult, at: dict, epoch_rng: dict,
          started: float, best: BestWeights) -> None:
    """Checkpoint the run as it stands (training time so far counted from `started`); rank 0 only."""
    clock(result, started, at["step"])
    if not distributed.is_main():
        return
    checkpoint.save(cp.directory, {
        "identity": cp.identity, "model": module.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "position": dict(at), "result": {**dataclasses.asdict(result), "carried": None}, "rng": rng_state(),
        "rng_epoch_start": epoch_rng,
        "best": dataclasses.asdict(best) if best.state is not None else None}, cp.name)


def clock(result: TrainResult, started: float, step: int) -> None:
    """Bring the run's and this session's time and last step up to now."""
    before = result.seconds
    result.seconds = time.perf_counter() - started
    session = result.sessions[-1]
    session["steps"][1] = step
    session["seconds"] += result.seconds - before


def resume(cp: Checkpointing, module, optimizer, scaler) -> dict | None:
    payload = checkpoint.load(cp.directory, cp.name)
    if payload is None:
        if cp.resume:
            log.warning("no checkpoint %s in %s yet; training from the start", cp.name, cp.directory)
        return None
    if not cp.resume:
        raise checkpoint.CheckpointError(f"{cp.directory} already holds a checkpoint; pass <option:resume> to "
                                         "continue it, or choose another folder (<option:checkpoint>)")
    checkpoint.check_belongs(payload, cp.identity, cp.directory)
    module.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    at = payload["position"]
    log.warning("resuming from %s: epoch %d, batch %d, step %d", cp.directory, at["epoch"] + 1, at["batch"],
                at["step"])
    return payload
