"""torchrun / DistributedDataParallel plumbing, kept out of models and the loop's maths.

``mriseg train`` launched by ``torchrun`` finds RANK/WORLD_SIZE/LOCAL_RANK in the environment
and joins the process group (NCCL on CUDA, gloo on CPU). A plain launch is world size 1.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group if launched by torchrun; a no-op for a single process."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: all must call)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(
    values: dict[str, float], info: DistInfo, device: torch.device
) -> dict[str, float]:
    """The mean of each scalar over all ranks (a collective: every rank calls it, same keys).

    One small all-reduce for all values together; a plain copy for a single process.
    """
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t_K = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)  # (K,)
    dist.all_reduce(t_K, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return {k: float(v) / info.world_size for k, v in zip(keys, t_K.tolist(), strict=True)}


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel whose buffers stay per rank after the start.

    Buffers such as the hard-token memory and the TCL code counts are updated by each rank
    from its own samples, so DDP must not overwrite them from rank 0 before every forward.
    ``forward_sync_buffers=False`` says that on torch >= 2.13 (where ``broadcast_buffers`` is
    deprecated); it still copies rank 0's buffers once at the start, which changes nothing
    here: every rank starts from the same seed or the same checkpoint.
    """
    device_ids = [info.local_rank] if device.type == "cuda" else None
    DDP = torch.nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, device_ids=device_ids, forward_sync_buffers=False)
    return DDP(model, device_ids=device_ids, broadcast_buffers=False)


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Send a picklable-free plain object (str/int/float/dict of them) from rank 0 to all."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
