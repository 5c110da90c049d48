"""Training with several processes (`torchrun`): process group, batch shards, reductions.

A run started by `torchrun --nproc_per_node=N` has `WORLD_SIZE=N` in its environment. Every
process then builds the same data with the same seed and draws the same global batch; each
process takes its own contiguous shard of it, so the order in which samples are seen is the
one of a single process with the same batch size. Losses are weighted so that averaging the
gradients over processes (what DistributedDataParallel does) gives the gradient of the mean
over the global batch. Without `WORLD_SIZE` (or with a world of one) nothing here starts a
process group and every function is a no-op.
"""

import contextlib
import datetime
import logging
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Generous: the first process may spend a long time generating data while the others wait.
TIMEOUT = datetime.timedelta(hours=2)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes files and logs (the first one, or the only one)."""
    return rank() == 0


def requested() -> bool:
    """Whether the environment asks for several processes (set by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group when `torchrun` asked for one; returns this process's device.

    The backend follows the device: NCCL for CUDA, gloo for the CPU. A CUDA device without an
    index becomes `cuda:LOCAL_RANK`, one GPU per process.
    """
    if not requested() or dist.is_initialized():
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    logger.info("process %d of %d (%s on %s)", rank(), world_size(), backend, device)
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the body on the first process, then on the others (e.g. to fill a data cache once).

    The others start once the first is done, whether it succeeded or failed; on failure they
    meet the same error themselves.
    """
    if world_size() == 1:
        yield
        return
    if not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_main():
            dist.barrier()


def shard(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], int]:
    """This process's contiguous part of a global batch, and how many samples it holds.

    With more processes than samples a process gets an empty part; it then holds the first
    sample instead (so that the network sees a non-empty batch) with a count of zero, and
    must give it no weight.
    """
    if world_size() == 1:
        return tensors, len(tensors[0])
    parts = tuple(torch.tensor_split(tensor, world_size())[rank()] for tensor in tensors)
    count = len(parts[0])
    if count == 0:
        parts = tuple(tensor[:1] for tensor in tensors)
    return parts, count


def sum_over_processes(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the processes (the values themselves for one process)."""
    if world_size() == 1:
        return values
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def broadcast(value: Any) -> Any:
    """The first process's `value` (a picklable object), on every process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
