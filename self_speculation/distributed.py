"""Several processes under torchrun: each takes a share of the examples, rank 0 gathers and writes the results;
training joins the group with the backend its device needs and agrees on numbers across the processes. Started
with plain python, everything here is a no-op for a single process."""

import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """The process's index on its machine (torchrun's LOCAL_RANK): which GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup() -> None:
    """Join the process group torchrun describes for inference, as training does (`join`): on GPUs each process
    first takes its own (cuda:LOCAL_RANK), so that its model, cache and collectives are not all on GPU 0."""
    join("nccl" if torch.cuda.is_available() else "gloo")


def shard(items: list) -> list[tuple[int, object]]:
    """This process's share: (index, item) for every world_size-th item, starting at its rank."""
    return [(i, item) for i, item in enumerate(items) if i % world_size() == rank()]


def gather(local: list) -> list | None:
    """Every process's list, concatenated, on rank 0 (None elsewhere)."""
    if world_size() == 1:
        return local
    parts = [None] * world_size() if rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    return [item for part in parts for item in part] if rank() == 0 else None


def teardown() -> None:
    """Leave the process group once every process has finished. gloo's worker threads drop a finished collective's
    tensors under the GIL; a process group destroyed while one of them waits for it deadlocks in its destructor,
    which joins them (seen at the end of a 2-process training run), so they get the GIL first."""
    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.1)
        dist.destroy_process_group()


def map_shards(items: list, work: Callable[[int, object], object],
               on_result: Callable[[object], None] | None = None) -> list | None:
    """`work(index, item)` over this process's share of `items`. On rank 0, `on_result` sees every result: its own
    as each completes (so a long run writes as it goes), the other processes' once gathered. Returns every
    result in item order on rank 0, None on the others."""
    local = []
    for index, item in shard(items):
        local.append((index, rank(), work(index, item)))
        if rank() == 0 and on_result is not None:
            on_result(local[-1][2])
    gathered = gather(local)
    if gathered is None:
        return None
    if on_result is not None:
        for _, origin, result in gathered:
            if origin != 0:
                on_result(result)
    return [result for _, _, result in sorted(gathered, key=lambda entry: entry[0])]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean(value: float) -> float:
    """The mean of a number over the processes (the number itself for one process)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / world_size()


def join(backend: str) -> None:
    """Join the process group torchrun describes with `backend`, gloo or nccl; once per process. With nccl, a
    process first takes its own GPU, and the few numbers kept on the CPU (a mean loss, a flag) go over gloo."""
    if world_size() > 1 and not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend)


def all_true(value: bool) -> bool:
    """Whether `value` is true on every process (the value itself for one process)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([0 if value else 1], dtype=torch.int64)
    dist.all_reduce(tensor)
    return tensor.item() == 0


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (on the CPU) summed over the processes (itself for one process)."""
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor
