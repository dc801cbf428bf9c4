"""torch.distributed for synthesis and distillation: who owns which batch, and the few collectives used.

A run launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) joins its process
group on first use: gloo when it computes on the CPU, NCCL on CUDA devices. A caller that set up
the group itself (``torch.distributed.init_process_group``) is used as it is. Outside torchrun
everything here is a no-op for a world of one, so single-process code paths are unchanged.

Collectives go through the group's backend, so every tensor sent is first moved to the
backend's device (the CPU for gloo, this rank's GPU for NCCL) and back to the CPU after.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Synthesis keeps ranks apart for as long as the slowest rank's share of batches takes (and
# IntraQ makes them wait batch by batch): the default 30-minute collective timeout is too short.
DEFAULT_TIMEOUT = datetime.timedelta(hours=6)


class DistributedError(RuntimeError):
    """A distributed run that cannot go on as configured (the message says what to change)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def owns(self, index: int) -> bool:
        """Batch ``index`` is computed by rank ``index % size`` (round robin keeps shares even)."""
        return index % self.size == self.rank

    def owner(self, index: int) -> int:
        return index % self.size

    def comm_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: torch.device | str | None = None) -> World:
    """Join the process group torchrun describes, if any and not joined yet; return this rank's World.

    ``device``: where this rank computes; a CUDA device selects NCCL (and this rank's GPU by
    ``LOCAL_RANK``), anything else gloo. ``DFQ_DIST_BACKEND`` overrides the choice.
    """
    if not dist.is_available():
        if launched_by_torchrun():
            raise DistributedError("this torch build has no torch.distributed; run one process")
        return World()
    if not dist.is_initialized() and launched_by_torchrun():
        cuda = device is not None and torch.device(device).type == "cuda"
        backend = os.environ.get("DFQ_DIST_BACKEND") or ("nccl" if cuda else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=DEFAULT_TIMEOUT)
    return current()


def current() -> World:
    """This process's place in the group (a world of one when no group is set up)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 dist.get_backend())


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this rank's GPU (``LOCAL_RANK``) under torchrun."""
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def broadcast_tensor(t: torch.Tensor | None, src: int, world: World) -> torch.Tensor:
    """``t`` from rank ``src`` on every rank (shape and dtype travel first, so others pass None)."""
    if not world.distributed:
        assert t is not None
        return t
    dev = world.comm_device()
    codes = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3, torch.int64: 4,
             torch.int32: 5, torch.uint8: 6, torch.bool: 7}
    dtypes = {v: k for k, v in codes.items()}
    head = torch.zeros(10, dtype=torch.int64, device=dev)
    if world.rank == src:
        if t.dtype not in codes or t.dim() > 8:
            raise DistributedError(f"cannot broadcast a {t.dtype} tensor of {t.dim()} dimensions")
        head[0], head[1] = codes[t.dtype], t.dim()
        head[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.broadcast(head, src)
    shape = tuple(int(s) for s in head[2:2 + int(head[1])])
    buf = t.detach().contiguous().to(dev) if world.rank == src else torch.empty(shape, dtype=dtypes[int(head[0])],
                                                                                  device=dev)
    dist.broadcast(buf, src)
    return buf.cpu()


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of ``t`` over ranks (a new tensor on ``t``'s device; ``t`` itself is left alone)."""
    if not world.distributed:
        return t
    buf = t.detach().to(world.comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def average_gradients(params: list[torch.Tensor], world: World) -> None:
    """Replace each gradient by its mean over ranks, in one flattened all-reduce: what DDP's
    reducer computes, for modules DDP cannot follow (see docs/distributed.md)."""
    if not world.distributed:
        return
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1).to(world.comm_device()) for p in with_grad])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.size
    offset = 0
    for p in with_grad:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad).to(p.grad.device))
        offset += n


def broadcast_buffers(module: torch.nn.Module, world: World, src: int = 0) -> None:
    """Every numeric buffer of ``module`` (observer ranges, scales and zero points, BN statistics)
    as rank ``src`` holds it, in one broadcast per dtype."""
    if not world.distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in module.buffers():
        if buf.dtype != torch.bool and buf.numel():
            by_dtype.setdefault(buf.dtype, []).append(buf)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1).to(world.comm_device()) for b in bufs])
        dist.broadcast(flat, src)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b).to(b.device))
            offset += b.numel()


def agree(flag: bool, world: World) -> bool:
    """Rank 0's ``flag`` on every rank (decisions that must not differ, e.g. a time budget)."""
    if not world.distributed:
        return flag
    return bool(broadcast_tensor(torch.tensor([int(flag)]), 0, world).item())


def same_everywhere(value: int, world: World) -> bool:
    """Whether every rank holds the same integer (e.g. the step a checkpoint resumed at)."""
    if not world.distributed:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64)
    lo_hi = all_reduce_max(t, world)
    return int(lo_hi[0]) == value and int(-lo_hi[1]) == value


def all_reduce_max(t: torch.Tensor, world: World) -> torch.Tensor:
    buf = t.detach().to(world.comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.cpu()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_rank_lock(world: World, lock: contextlib.AbstractContextManager) -> Iterator[None]:
    """Rank 0 holds a cache entry's lock on behalf of the whole group (other ranks taking it too
    would wait on rank 0 while rank 0 waits on them)."""
    if world.is_main:
        with lock:
            yield
    else:
        yield


__all__ = ["DistributedError", "World", "agree", "all_reduce_sum", "average_gradients", "barrier",
           "broadcast_buffers", "broadcast_tensor", "current", "init_from_env", "launched_by_torchrun",
           "local_device", "main_rank_lock", "same_everywhere"]
