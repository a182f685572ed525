"""torch.distributed through torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain process otherwise."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun set up (nccl on GPU, gloo on CPU); one process when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in a single process); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """The model every rank steps: DistributedDataParallel under torchrun, the model itself otherwise."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile and DDP (what checkpoints and artifacts hold)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def gather_objects(obj) -> list:
    """Every rank's picklable object, in rank order ([obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def per_rank_batch(global_batch: int, info: DistInfo, key: str = "data.batch_size") -> int:
    """Batch sizes are global everywhere: each of the world_size processes takes an equal share."""
    if global_batch % info.world_size:
        raise UserError(f"{key}={global_batch} (global) does not divide over {info.world_size} processes")
    return global_batch // info.world_size
