"""Running under ``torchrun``: join the process group PyTorch's launcher describes, and say who does what.

``torchrun --nproc-per-node N -m compressor --teacher ... --out DIR`` starts N copies of the main job; each finds
its rank in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, set by torchrun, which also handles
multi-node flags such as ``--nnodes`` and ``--rdzv-endpoint``). Every rank loads the teachers and the data and
trains its share of each batch (``compressor.training.loop``) and runs the teachers on its share of the transfer set
(``compressor.training.teacher_shards``); rank 0 alone writes the teacher cache, checkpoints and artifacts, exports,
benchmarks and reports. Without torchrun nothing here changes anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from compressor.core.errors import CompressorError


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, on ``device``, over ``backend``."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        """JSON-safe summary for the report."""
        return {"world_size": self.size, "backend": self.backend, "device": self.device}


def process_rank() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1) without one: the one place that asks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def training_device(requested: str, local_rank: int = 0) -> str:
    """The device to train on: ``cuda:<local rank>`` when CUDA is there (or asked for), else ``cpu``."""
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise CompressorError("--device cuda: no CUDA device is visible here; use --device cpu or run on a GPU machine")
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def join(requested_device: str = "auto") -> World:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU); else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=training_device(requested_device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = training_device(requested_device, local_rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group(backend)
        except (RuntimeError, ValueError) as exc:
            raise CompressorError(f"could not join the torchrun process group over {backend} ({exc}); check "
                                  f"MASTER_ADDR/MASTER_PORT or the --rdzv-endpoint given to torchrun") from exc
    rank, size = process_rank()
    return World(rank, size, local_rank, backend, device)


def barrier(world: World) -> None:
    """Wait for every rank (no-op in a world of one)."""
    if world.size > 1:
        torch.distributed.barrier()


def broadcast_from_main(world: World, value):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself in a world of one."""
    if world.size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def leave(world: World) -> None:
    """Leave the process group (no-op in a world of one)."""
    if world.size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
