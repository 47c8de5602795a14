"""Splitting a detector's prompts across processes, and merging what each process measured.

`torchrun --nproc_per_node=N -m headscope.apps.cli rank ...` starts N processes; the CLI calls
`init_distributed()` once, then every process runs every detector. A detector stays simple: it
builds its full prompt set exactly as in a single process (same seed, same prompts), keeps only
its own contiguous slice with `shard(...)`, accumulates *sums and counts* over that slice, and
merges them with `all_reduce_sum(...)` before dividing. With one process (no torchrun, plain
Python, notebooks) every function here is the identity, so the same detector code runs anywhere.

Pattern for detector authors (sums and counts, never per-shard means: shards can differ in size):

    from headscope.circuits.sharding import shard, all_reduce_sum, is_main

    prompts = make_prompts(..., seed=config.seed)               # the full, global set
    total = torch.zeros(L, H, dtype=torch.float64)              # float64: merge order then barely matters
    count = torch.zeros(L, H, dtype=torch.float64)
    for batch in batched(shard(prompts), config.batch_size):   # this process's contiguous slice
        rec = ...                                               # record stats for the batch
        total += masked_sum_over_batch_and_positions            # [L, H]
        count += number_of_positions_counted                    # [L, H] (or a scalar tensor)
    total, count = all_reduce_sum(total, count)                # every process now holds global sums
    score = total / count

Per-trial records that are not sums (e.g. retrieval trials later filtered and averaged) go
through `gather_lists(my_trials)` (JSON values), which returns every process's list concatenated in rank
order; with contiguous shards that is the single-process order. Anything random must be drawn
from the seed the same way on every process (e.g. the random head sets of causal validation), so
each process computes identical validation; or shard the validation prompts too and reduce the
summed damages. Show progress bars only where `is_main()` so N processes do not print N bars.
"""

from __future__ import annotations

import json
import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from headscope.probe.errors import DeviceError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True in the process that prints and writes files (rank 0, or the only process)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "cpu") -> str:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); no-op in a single process.

    Returns the device this process should use: on CUDA each process takes the GPU of its
    LOCAL_RANK, so `--device cuda` with N processes spreads over N GPUs.
    """
    if not launched_by_torchrun() or is_distributed():
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise DeviceError(f"process with LOCAL_RANK {local} has no GPU: only {torch.cuda.device_count()} visible; "
                              "start fewer processes (--nproc_per_node).")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int) -> tuple[int, int]:
    """[start, stop) of this process's contiguous share of n items (sizes differ by at most one)."""
    ws, r = world_size(), rank()
    base, extra = divmod(n, ws)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(items: Sequence[T]) -> Sequence[T]:
    """This process's contiguous slice of items (a list, a tensor along dim 0, ...); all of them
    when not distributed. A process may get an empty slice when there are fewer items than
    processes: keep its sums at zero and still call `all_reduce_sum`."""
    start, stop = shard_bounds(len(items))
    return items[start:stop]


def _collective_device() -> torch.device:
    # nccl only reduces CUDA tensors; gloo only CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(*tensors: torch.Tensor):
    """Sum each tensor over all processes; returns new tensors (one, or a tuple) on the input's
    device and dtype. Every process must call it with the same shapes, in the same order."""
    out = []
    for t in tensors:
        t = torch.as_tensor(t)
        if is_distributed():
            buf = t.detach().to(_collective_device(), copy=True)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t = buf.to(t.device)
        out.append(t)
    return out[0] if len(out) == 1 else tuple(out)


def gather_lists(items: list) -> list:
    """Concatenate every process's list in rank order; the list itself when single.

    Items must be JSON values (numbers, strings, lists, dicts): they travel as JSON bytes, never
    as pickles. Floats survive exactly (JSON writes their shortest round-trip repr).
    """
    if not is_distributed():
        return list(items)
    payload = torch.frombuffer(bytearray(json.dumps(list(items)).encode()), dtype=torch.uint8)
    dev = _collective_device()
    size = torch.tensor([payload.numel()], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8, device=dev)
    buf[: payload.numel()] = payload.to(dev)
    parts = [torch.empty_like(buf) for _ in range(world_size())]
    dist.all_gather(parts, buf)
    out: list = []
    for part, s in zip(parts, sizes):
        out += json.loads(bytes(part[: int(s.item())].cpu().tolist()).decode())
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
