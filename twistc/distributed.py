"""Data-parallel training under torchrun: the process group and the few collectives twistc needs.

`torchrun --nproc-per-node N -m twistc compile ...` starts N processes with RANK and WORLD_SIZE in
their environment; `init_from_env` joins them into one process group (gloo for CPU tensors, and
NCCL for CUDA tensors where torch sees GPUs; multi-node through torchrun's own rendezvous flags).
Each rank then trains a DistributedDataParallel copy on its shard of the batches, on GPU LOCAL_RANK
when it trains on CUDA; the ranks share the evaluations during training, and rank 0 alone evaluates
before and after, exports and writes.
"""
from __future__ import annotations

import datetime
import gc
import itertools
import logging
import os
import signal
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from twistc.errors import SpecError, first_line

log = logging.getLogger(__name__)


def backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors where there are GPUs and torch has NCCL."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def timeout() -> float:
    """Seconds a rank waits for the others in a collective before the run ends with an error
    (TWISTC_COLLECTIVE_TIMEOUT, default 600)."""
    text = os.environ.get("TWISTC_COLLECTIVE_TIMEOUT", "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise SpecError(f"TWISTC_COLLECTIVE_TIMEOUT must be a number of seconds > 0, got {text!r}")
    return seconds


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (nothing to do without torchrun, or
    in a process that is in a group already); True when this call joined it. A collective that waits
    longer than timeout() fails on every rank; a rank whose torchrun agent dies (even by SIGKILL) gets
    SIGTERM, so no rank outlives its launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    _end_with_parent()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device("cuda"))
    dist.init_process_group(backend(), timeout=datetime.timedelta(seconds=timeout()))
    return True


def leave() -> None:
    """Leave the process group once this rank's last collective is done (nothing to do without one). What
    still holds the group, such as a DDP wrapper in a reference cycle, is collected first, so the group's
    threads are joined here rather than in the interpreter's teardown, where gloo can abort the process."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _end_with_parent() -> None:
    """SIGTERM to this process when its parent ends (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def collective_failure(e: BaseException) -> str | None:
    """A one-line account of a collective that timed out or lost a peer, or None for other errors."""
    text = f"{type(e).__name__}: {e}"
    if world()[1] == 1 and not isinstance(e, getattr(dist, "DistError", ())):
        return None
    if any(s in text for s in ("Timed out", "timed out", "Timeout", "Connection closed by peer", "Connection reset",
                               "DistBackendError", "DistNetworkError")):
        return (f"rank {world()[0]}: the other ranks did not answer within {timeout():g} s (a rank failed, was "
                f"stopped or is stuck: {first_line(e)[:160]}); TWISTC_COLLECTIVE_TIMEOUT sets the wait")
    return None


def local_device(device: str) -> str:
    """The device this rank trains on: plain "cuda" is GPU LOCAL_RANK (one GPU per process, as torchrun
    starts them); "cpu" and an explicit "cuda:N" stay as they are."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def wrap(module: nn.Module) -> nn.Module:
    """The module as DistributedDataParallel when there are several ranks (parameters and buffers are
    broadcast from rank 0 as it is built), else the module itself."""
    if world()[1] == 1:
        return module
    device = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def shard(batches: Iterator, count: int | None) -> tuple[Iterator, int | None]:
    """Every world-size-th batch, from this rank's index on, as many on every rank (see common_length)."""
    rank, size = world()
    if size == 1:
        return batches, count
    return common_length(itertools.islice(batches, rank, None, size), None if count is None else
                         count // size + (rank < count % size))


def common_length(batches: Iterator, count: int | None) -> tuple[Iterator, int | None]:
    """This rank's batches cut to a length every rank has, so that their steps stay in lockstep and none
    waits for good in a collective: the shortest rank's count when all ranks know theirs (a warning
    when they differ), else batch by batch, the epoch ending for all when one rank runs out."""
    if world()[1] == 1:
        return batches, count
    t = torch.tensor([-1 if count is None else count, -(-1 if count is None else count)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    least, most = int(t[0]), -int(t[1])
    if least >= 0:
        if least != most and is_main():
            log.warning("warning: the ranks' train_data() give %d to %d batches; each rank trains on %d per epoch",
                        least, most, least)
        return itertools.islice(batches, least), least
    return _in_lockstep(batches), None


def _in_lockstep(batches: Iterator) -> Iterator:
    """The batches while every rank still has one (one small all-reduce per batch)."""
    iterator = iter(batches)
    while True:
        item = next(iterator, None)
        if not all_ranks(item is not None):
            if item is not None and is_main():
                log.warning("warning: another rank's train_data() ran out first; this epoch ends there on every rank")
            return
        yield item


def all_ranks(flag: bool) -> bool:
    """Whether every rank raised `flag`."""
    return not any_rank(not flag)


def my_share(batches: Iterable) -> Iterator:
    """Every world-size-th batch from this rank's index on (all of them outside a process group); for
    work whose results are summed over the ranks, such as counting correct predictions."""
    rank, size = world()
    return iter(batches) if size == 1 else itertools.islice(batches, rank, None, size)


def total(*counts: int) -> list[int]:
    """Each count summed over the ranks."""
    if world()[1] == 1:
        return list(counts)
    t = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(t)
    return t.tolist()


def sum_(tensor: torch.Tensor) -> None:
    """`tensor` summed over the ranks, in place."""
    if world()[1] > 1:
        dist.all_reduce(tensor)


def mean(value: float) -> float:
    """`value` averaged over the ranks."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world()[1]


def any_rank(flag: bool) -> bool:
    """Whether any rank raised `flag` (a no-op outside a process group)."""
    if world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def average_gradients_(optimizer: torch.optim.Optimizer) -> None:
    """Average the gradients of `optimizer`'s parameters over the ranks, in place (what DDP does in a
    backward outside no_sync)."""
    size = world()[1]
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(size)


def broadcast_(tensor: torch.Tensor) -> None:
    """Make `tensor` equal on every rank to rank 0's, in place."""
    if world()[1] > 1:
        dist.broadcast(tensor, src=0)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (pickled)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
