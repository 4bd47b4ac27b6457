"""Collectives for methods that keep state across the global batch (CRD's memory): no-ops in one process.

Here rather than in the engine (``helper.distributed``) so that a method in ``distiller_zoo/`` needs nothing from
``helper/``; the engine uses them too."""

from __future__ import annotations

import math

import torch
import torch.distributed as tdist


def active() -> bool:
    """Whether this process is one of several in a process group."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def shard_rows(batch_size: int) -> int | None:
    """The most rows a process takes from a global batch of ``batch_size`` (None for one process)."""
    return math.ceil(batch_size / tdist.get_world_size()) if active() else None


def all_gather_rows(x: torch.Tensor, max_rows: int | None = None) -> torch.Tensor:
    """The rows of ``x`` (B, ...) from every process, concatenated (no gradient).

    Collectives need equal shapes: each process pads its rows to ``max_rows`` by repeating its first row, so
    the result may hold duplicate rows (fine for updates that write the same value twice). Without
    ``max_rows`` the processes first exchange their row counts (one host synchronisation).
    """
    if not active():
        return x
    x = x.detach()
    if max_rows is None:
        count = torch.tensor([x.shape[0]], device=x.device)
        tdist.all_reduce(count, op=tdist.ReduceOp.MAX)
        max_rows = int(count.item())
    if x.shape[0] < max_rows:
        x = torch.cat([x, x[:1].expand(max_rows - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over processes of ``x`` (a new tensor, no gradient)."""
    total = x.detach().clone()
    if active():
        tdist.all_reduce(total)
    return total
