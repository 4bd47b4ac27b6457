"""One run on several processes (``torchrun``): the process group, the share of each global batch, DDP, and
the reductions that keep a multi-process run equal to the single-process one.

    torchrun --nproc_per_node 4 train_student.py --path_t ... --distill crd --model_s resnet8x4

The protocol does not change with the number of processes: ``--batch_size`` is the GLOBAL batch. Every process
holds the training set on its device and draws the same epoch plan (permutation, crops, flips, CRD negatives:
all derived from (seed, epoch)), so every process sees the same global batch and keeps rows ``rank::world`` of
it. Each process's loss is the mean over its rows; weighting it by ``rows * world / global rows`` makes DDP's
average of the per-process gradients equal the gradient of the global batch's mean loss, also when the last
partial batch splits unevenly. Meters are sums of per-sample values, added over processes.

What still differs from one process: BatchNorm normalises with the statistics of each process's rows (as in
any DDP run); ``--sync_bn`` normalises with those of the global batch instead (torch's ``SyncBatchNorm`` on
CUDA, :class:`PortableSyncBatchNorm` elsewhere), which makes the forward pass that of a single process.
Batch-relational losses (SP, CC, RKD, PKT, DIST, MLKD) relate the rows of each process's share only.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.collectives import active, all_reduce_sum
from common.errors import UsageError
from dataset.batch import Batch

log = logging.getLogger("kd")

STOP_EVERY = 20  # steps between two checks of a stop request across processes


def choose_device(name: str | None) -> torch.device:
    """``--device``, else CUDA when available, else the CPU (one process)."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------------------
# The processes of one run


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in the run: ``Distributed()`` is a single process, and every method is then
    a no-op (or the identity), so the single-process path runs exactly as without this class."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    cpu_group: Any = None  # a gloo group for host-side flags (None: the default group, already gloo)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run folder (logs, args.json, metrics, TensorBoard, checkpoints, summary)."""
        return self.rank == 0

    def record(self) -> dict[str, Any]:
        """What ``args.json`` and ``summary.json`` note about the processes (nothing for one process)."""
        return {"world_size": self.world_size, "backend": self.backend} if self.enabled else {}

    def batchnorm(self, module: nn.Module, sync: bool, device: torch.device) -> nn.Module:
        """``module`` with its BatchNorm layers over the global batch when ``sync`` (``--sync_bn``) and there
        are several processes; unchanged otherwise."""
        return convert_sync_batchnorm(module, device) if sync and self.enabled else module

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier(group=self.cpu_group)

    def check_batches(self, num_images: int, batch_size: int, drop_last: bool) -> None:
        """Every process needs at least one row of every global batch (an empty share has no mean loss)."""
        if not self.enabled:
            return
        last = num_images % batch_size if not drop_last else 0
        smallest = last or min(batch_size, num_images)
        if smallest < self.world_size:
            raise UsageError(
                f"--batch_size {batch_size} with {num_images} training images gives a batch of {smallest} "
                f"images, fewer than the {self.world_size} processes; use a larger --batch_size, --drop_last, "
                "or fewer processes"
            )

    def shard(self, batch: Batch) -> tuple[Batch, float]:
        """This process's rows (``rank::world``) of a global batch, and the weight of its mean loss:
        ``rows * world / global rows`` (exactly 1.0 when the batch splits evenly)."""
        if not self.enabled:
            return batch, 1.0
        rows = slice(self.rank, None, self.world_size)
        part = Batch(*(None if t is None else t[rows] for t in batch))
        return part, part.target.shape[0] * self.world_size / batch.target.shape[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes of ``tensor`` (a new tensor; on the device, no host synchronisation)."""
        return all_reduce_sum(tensor) if self.enabled else tensor

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        """The minimum over processes of ``tensor`` (a new tensor, on the device)."""
        total = tensor.detach().clone()
        if self.enabled:
            tdist.all_reduce(total, op=tdist.ReduceOp.MIN)
        return total

    def agreed(self, flag: Callable[[], bool], every: int = STOP_EVERY) -> Callable[[], bool]:
        """``flag`` asked of every process and true if true for any: a signal that reaches the processes at
        different steps still stops them all after the same step. The processes ask each other once every
        ``every`` calls (a collective per step would make each step wait for the slowest process), so a
        signal stops a multi-process run within ``every`` steps."""
        if not self.enabled:
            return flag
        calls = itertools.count(1)

        def any_process() -> bool:
            if next(calls) % every:
                return False
            value = torch.tensor([int(flag())])
            tdist.all_reduce(value, op=tdist.ReduceOp.MAX, group=self.cpu_group)
            return bool(value.item())  # a CPU tensor of the gloo group: no device synchronisation

        return any_process

    def wrap(self, objective: Any, optimizer: torch.optim.Optimizer) -> Any:
        """``objective`` under DistributedDataParallel over the parameters ``optimizer`` trains (one process:
        the objective itself)."""
        if not self.enabled:
            return objective
        return DDPObjective(objective, optimizer)

    def broadcast_buffers(self, modules: Iterable[nn.Module]) -> None:
        """Rank 0's buffers (BatchNorm running statistics, CRD memory) to every process, as DDP does by
        default: evaluation and checkpoints then see one model."""
        if not self.enabled:
            return
        for module in modules:
            for buffer in module.buffers():
                tdist.broadcast(buffer, src=0)


def setup(device_flag: str | None) -> tuple[Distributed, torch.device]:
    """This process's place and device. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): join the
    process group (nccl on CUDA, gloo on the CPU), one GPU per local rank; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), choose_device(device_flag)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device_flag, local_rank)
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    elif tdist.get_world_size() != world_size:
        raise RuntimeError(f"WORLD_SIZE {world_size} but a process group of {tdist.get_world_size()}")
    backend = tdist.get_backend()
    cpu_group = None if backend == "gloo" else tdist.new_group(backend="gloo")
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one voice: rank 0 reports
    log.info("process group: %d processes (%s); rank 0 on %s writes the run folder", world_size, backend, device)
    return Distributed(rank, world_size, local_rank, backend, cpu_group), device


def rank_device(device_flag: str | None, local_rank: int) -> torch.device:
    """``--device cuda`` (or none, with CUDA present) means this local rank's GPU; ``cpu`` means the CPU."""
    device = choose_device(device_flag)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise UsageError(
            f"--device {device_flag} would put every process on one GPU; under torchrun pass --device cuda "
            "(each process takes the GPU of its LOCAL_RANK; CUDA_VISIBLE_DEVICES picks the GPUs)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Leave the process group when a command ends, if the command joined it."""
    joined_before = tdist.is_available() and tdist.is_initialized()
    try:
        yield
    finally:
        if not joined_before and tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# DistributedDataParallel over an objective


class _Trained(nn.Module):
    """The parameters an optimizer trains, as one module, and the objective as its forward: DDP then averages
    the gradients of exactly what is trained (student, adapters, learned temperature), whatever the method."""

    def __init__(self, objective: Any, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.objective = objective  # not a module: its modules' parameters are registered below
        self.params = nn.ParameterList(params)

    def forward(self, batch: Batch) -> Any:
        terms, logits = self.objective(batch)
        # Only the loss terms lead to the parameters: the logits (scored for the training accuracy) may depend
        # on parameters the loss does not use (SimKD's student classifier), which DDP would wait for.
        return terms, logits.detach()


class DDPObjective:
    """An engine objective whose backward averages gradients over processes (DistributedDataParallel).

    ``static_graph``: some methods leave trained parameters out of every step's graph (SimKD's student
    classifier, the student during an init stage); the set is fixed within a stage, so DDP learns it on the
    first step instead of searching the graph at every step. The wrapped module has no buffers: CRD's memory
    is kept equal by its own update, and BatchNorm statistics are taken from rank 0 once per epoch
    (:meth:`Distributed.broadcast_buffers`).
    """

    def __init__(self, objective: Any, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.objective = objective
        self.ddp = DistributedDataParallel(_Trained(objective, params), static_graph=True)

    def train(self) -> None:
        self.objective.train()

    def __call__(self, batch: Batch) -> Any:
        return self.ddp(batch)


# ----------------------------------------------------------------------------------------------------------
# BatchNorm over the global batch


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) with its gradient (the sum of the gradients)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        tdist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        tdist.all_reduce(grad)
        return grad


class PortableSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the statistics of the global batch, on any device and backend (torch's SyncBatchNorm
    runs on GPUs only). Same parameters, buffers and state_dict keys as ``nn.BatchNorm*d``; in one process, or
    in evaluation mode, it is ``nn.BatchNorm*d``.

    Mean first, then the variance around it (two reductions), as a single process's two-pass BatchNorm does,
    so the result agrees with one process to float rounding."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float()
        count = xf.new_tensor([x.numel() / x.shape[1]])
        totals = _SumOverProcesses.apply(torch.cat([xf.sum(dims), count]))  # (C + 1,)
        n = totals[-1]
        mean = totals[:-1] / n  # (C,)
        centred = xf - mean.view(shape)
        var = _SumOverProcesses.apply(centred.square().sum(dims)) / n  # biased, as used to normalise
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * (n / (n - 1)).detach())
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var, alpha=factor)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` normalised over the global batch (``--sync_bn``); same state_dict."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, PortableSyncBatchNorm):
        sync = PortableSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        sync.training = module.training
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
