"""Multi-process training with ``torch.distributed``: set up from ``torchrun``'s environment.

``torchrun --nproc_per_node N -m lps_fast.cli train TASK ...`` starts N processes; each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` and joins one process group: NCCL when the model
runs on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU. A single process (no
``WORLD_SIZE`` or 1) uses no process group at all, and every helper here becomes a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Context:
    """Where this process stands: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes (in place, returned); float64 sums travel on the device
        the backend needs (NCCL: CUDA)."""
        if not self.distributed:
            return tensor
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved.to(tensor.device))
        return tensor

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy every buffer of ``module`` (batch-norm running statistics) from rank 0 to all
        processes. DDP broadcasts them at the start of each forward pass, so after a step every
        process holds its own update; this makes the copies one model again."""
        if not self.distributed:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def all_reduce_max(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())



def shutdown() -> None:
    """Leave the process group (at the end of a program: runs in one process share one group,
    since a group cannot be joined again once left)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when available, else CPU. Asking for CUDA without it is a clear error."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested not in ("auto", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {requested!r}")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "cuda":
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device("cpu")


def setup(requested_device: str, timeout_minutes: float = 30.0) -> Context:
    """Join the process group when launched by ``torchrun`` with more than one process (or reuse
    the one this process already joined)."""
    world_size = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size <= 1:
        return Context(device=device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shard(count: int, context: Optional[Context]) -> range:
    """The sample indices this process evaluates: every ``world_size``-th one, none repeated
    (so the summed metrics count each sample once)."""
    if context is None or not context.distributed:
        return range(count)
    return range(context.rank, count, context.world_size)


__all__ = ["Context", "setup", "shutdown", "pick_device", "shard", "world_size_from_env"]
