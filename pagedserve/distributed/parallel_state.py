"""Which tensor-parallel rank this process is, and the collectives the parallel layers call.

One process group per engine: the default group on the device's backend (NCCL on CUDA, gloo on
the CPU) for the layers' tensors, and a gloo group for the small Python objects rank 0 sends the
workers each step. With one rank (the default) every collective is the identity, so the layers
cost nothing when tensor parallelism is off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

#: How long a collective waits for a rank before failing (loading a large model's shards on a
#: slow rank happens inside the first collective's wait).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class TensorParallelState:
    rank: int = 0
    world_size: int = 1
    #: The gloo group for step messages (None with one rank).
    cpu_group: Any = None


_state = TensorParallelState()
#: Set in a worker process before its runner is built (rank 0's runner starts the workers).
_worker_process = False
#: The process's intra-op threads before this rank took its share of the cores (CPU only).
_threads_before: int | None = None


def get_tp_rank() -> int:
    return _state.rank


def get_tp_world_size() -> int:
    return _state.world_size


def is_initialized() -> bool:
    return _state.world_size > 1


def is_worker_process() -> bool:
    return _worker_process


def mark_worker_process() -> None:
    global _worker_process
    _worker_process = True


def backend_for(device_type: str) -> str:
    """NCCL for CUDA tensors, gloo for everything else."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device_type: str) -> None:
    """Join the engine's process group as ``rank`` of ``world_size``."""
    global _state
    if device_type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:  # the ranks of a machine share its cores, rather than each taking all of them
        global _threads_before
        _threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, _threads_before // world_size))
    dist.init_process_group(
        backend_for(device_type),
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    cpu_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if device_type == "cuda" else dist.group.WORLD
    _state = TensorParallelState(rank, world_size, cpu_group)


def _restore_threads() -> None:
    global _threads_before
    if _threads_before is not None:
        torch.set_num_threads(_threads_before)
        _threads_before = None


def destroy_tensor_parallel() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = TensorParallelState()
    _restore_threads()


def forget_tensor_parallel() -> None:
    """Leave a group a rank died in: drop it without the collective a clean destroy may need."""
    global _state
    _state = TensorParallelState()
    _restore_threads()
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the group is broken already; nothing left to release
        pass


@contextlib.contextmanager
def assumed_rank(rank: int, world_size: int) -> Iterator[None]:
    """Build layers as ``rank`` of ``world_size`` without a process group (checking at start-up,
    on the ``meta`` device, that a model shards before any worker starts)."""
    global _state
    previous = _state
    _state = TensorParallelState(rank, world_size)
    try:
        yield
    finally:
        _state = previous


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place; returned for chaining)."""
    if _state.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along ``dim``, in rank order."""
    if _state.world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(_state.world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=dim)


def agree_min(value: int) -> int:
    """The smallest ``value`` over the ranks (every rank calls it): a capacity all can hold."""
    if _state.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_state.cpu_group)
    return int(tensor.item())


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (through the gloo group)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_state.cpu_group)
    return box[0]
