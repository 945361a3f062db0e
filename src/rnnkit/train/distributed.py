"""Process-group setup for DistributedDataParallel, read from torchrun's environment.

The same command runs with and without torchrun: without WORLD_SIZE in the environment (or
with WORLD_SIZE=1) everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(use_cuda: bool | None = None) -> DistributedContext:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU); no-op if alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if world_size <= 1:
        device = torch.device("cuda") if use_cuda else torch.device("cpu")
        return DistributedContext(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank, device)


def teardown_distributed(context: DistributedContext) -> None:
    """Leave the process group if this process joined one."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def any_process(flag: bool, context: DistributedContext) -> bool:
    """True on every process if `flag` is true on at least one (a collective when distributed)."""
    if not context.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_over_processes(value: float, context: DistributedContext) -> float:
    """The mean of a per-process number over all processes."""
    if not context.enabled:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size
