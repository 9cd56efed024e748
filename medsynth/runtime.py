"""Process-group setup for ``torchrun``: gloo on CPU, nccl on GPUs; rank 0 alone logs and writes.

Launch (one machine, two processes)::

    torchrun --nproc_per_node=2 -m medsynth train configs/quickstart.yaml

Besides training (DDP), batch work is split across the ranks: :func:`shard` gives each rank its items
and :func:`map_sharded` computes them round by round, gathering every round's results on rank 0
(see docs/scale_out.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from medsynth.errors import MedsynthError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
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


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """CUDA when present (or requested), else CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA only (the project's device convention); fp32 on CPU."""
    if precision == "bf16" and device.type != "cuda":
        raise MedsynthError("train.precision 'bf16' needs CUDA; use 'auto' or 'fp32' on CPU")
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.bfloat16
    return None


def setup(requested_device: str = "auto") -> DistContext:
    """Join the process group when launched by ``torchrun``; a single process otherwise.

    Also sets a sensible ``torch.set_num_threads`` so that processes sharing a machine do not
    oversubscribe its cores.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = select_device(requested_device, local_rank)
    if device.type == "cpu":
        # OMP_NUM_THREADS when the user (or torchrun) set it, else the machine's cores shared out
        threads = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(
            int(threads)
            if threads.isdigit() and int(threads) > 0
            else max(1, (os.cpu_count() or 1) // max(1, local_world))
        )
    else:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    global _OBJECT_GROUP
    _OBJECT_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


# --- work split across ranks ---------------------------------------------------------------------


def shard(count: int, rank: int, world_size: int) -> list[int]:
    """The items of ``rank`` among ``0..count-1``: ``i`` with ``i % world_size == rank``.

    Round robin, so shares differ by at most one item and every item belongs to exactly one rank.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    return list(range(rank, max(0, count), world_size))


_OBJECT_GROUP: Any = None


def _object_group() -> Any:
    """The group that carries pickled CPU results: the default one under gloo, a gloo side group under nccl
    (so that results are not staged through GPU memory). Created once, collectively, on first use."""
    global _OBJECT_GROUP
    if dist.get_backend() == "gloo":
        return None
    if _OBJECT_GROUP is None:
        _OBJECT_GROUP = dist.new_group(backend="gloo")
    return _OBJECT_GROUP


def from_main(obj: T, ctx: DistContext) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process): one decision for all ranks."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_object_group())
    return box[0]


def gather_to_main(obj: T, ctx: DistContext) -> list[T] | None:
    """Every rank's ``obj`` on rank 0, in rank order (``None`` on the other ranks); ``[obj]`` in a single
    process. A collective: every rank must call it the same number of times."""
    if not (ctx.distributed and dist.is_initialized()):
        return [obj]
    received: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, received, dst=0, group=_object_group())
    return received


def map_sharded(
    compute: Callable[[list[int]], Sequence[T]], count: int, ctx: DistContext, *, chunk: int = 1
) -> Iterator[list[tuple[int, T]]]:
    """Compute items ``0..count-1`` split across the ranks (:func:`shard`), ``chunk`` items per rank per round.

    ``compute(indices)`` returns one result per index. After each round rank 0 gathers the round's
    results and gets them as ``(index, result)`` pairs in index order (round ``r`` holds the indices
    ``r * chunk * world_size`` up to ``(r + 1) * chunk * world_size``); the other ranks get an empty
    list for every round, so that all ranks run the same loop. Only one round's results are in
    flight at a time, which bounds rank 0's memory for a long list of items. In a single process the
    rounds are plain batches of ``chunk`` consecutive items.

    Every rank must iterate to the end (the rounds are collectives).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    mine = shard(count, ctx.rank, ctx.world_size)
    rounds = math.ceil(len(shard(count, 0, ctx.world_size)) / chunk)  # rank 0 holds the largest share
    for r in range(rounds):
        part = mine[r * chunk : (r + 1) * chunk]
        results = list(compute(part)) if part else []
        if len(results) != len(part):
            raise ValueError(f"compute returned {len(results)} results for {len(part)} items")
        gathered = gather_to_main(list(zip(part, results)), ctx)
        yield (
            [] if gathered is None else sorted((pair for pairs in gathered for pair in pairs), key=lambda pair: pair[0])
        )
