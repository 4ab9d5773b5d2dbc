"""Data-parallel training under torchrun: the process group and the few collectives twistc needs.

`torchrun --nproc-per-node N -m twistc compile ...` starts N processes with RANK and WORLD_SIZE in
their environment; `init_from_env` joins them into one process group (gloo for CPU tensors, and
NCCL for CUDA tensors where torch sees GPUs; multi-node through torchrun's own rendezvous flags).
Each rank then trains a DistributedDataParallel copy on its shard of the batches, on GPU LOCAL_RANK
when it trains on CUDA; the ranks share the evaluations during training, and rank 0 alone evaluates
before and after, exports and writes.
"""
from __future__ import annotations

import itertools
import os
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn


def backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors where there are GPUs and torch has NCCL."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (nothing to do without torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device("cuda"))
        dist.init_process_group(backend())


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
    """Every world-size-th batch, from this rank's index on; all ranks get the same number (the last
    `count % world` batches are dropped), so that their steps stay in lockstep."""
    rank, size = world()
    if size == 1:
        return batches, count
    if count is None:
        raise ValueError("under torchrun, train_data() must return an iterable with a length, or take rank "
                         "and world_size and shard itself")
    per_rank = count // size
    return itertools.islice(batches, rank, per_rank * size, size), per_rank


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
