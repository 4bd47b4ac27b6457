"""DOT: "DOT: A Distillation-Oriented Trainer", Zhao, Song, Cui, Qiu and Liang, ICCV 2023, arXiv 2307.08436.

Optimizer: SGD with two momentum buffers per parameter, one for the gradient of the task loss (CE) and one for
the gradient of the distillation loss, the first with momentum ``m - delta`` and the second with ``m + delta``,
so that the distillation gradient dominates the update direction. It serves every method (``--dot``); the
engine back-propagates the two losses separately (``helper.engine``: the ``ce`` term is the task loss, every
other term the distillation loss).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["DistillationOrientedTrainer", "add_dot_arguments", "dot_optimizer"]

# mdistiller mdistiller/engine/cfg.py (commit a08d46f): CFG.SOLVER.DOT.DELTA = 0.075; the three CIFAR-100
# configs configs/cifar100/dot/*.yaml use it with SOLVER.MOMENTUM 0.9.
DOT_DELTA = 0.075


def add_dot_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DOT optimizer")
    group.add_argument(
        "--dot", action="store_true", help="train with DOT: separate momenta for the CE and distillation gradients"
    )
    group.add_argument(
        "--dot_delta", type=float, default=DOT_DELTA,
        help=f"DOT: momentum --momentum - delta for CE, + delta for distillation (mdistiller: {DOT_DELTA})",
    )  # fmt: skip


class DistillationOrientedTrainer(torch.optim.Optimizer):
    """SGD with a task momentum ``momentum`` and a distillation momentum ``momentum_kd`` (mdistiller's
    ``DistillationOrientedTrainer``, ``mdistiller/engine/dot.py``; its ``dampening`` is always 0 there).

    One step is ``step_kd()`` after the distillation loss's backward (it keeps the gradients), then ``step()``
    after the task loss's backward. For a parameter that gets both gradients, the task buffer is
    ``m_task * b + (g_task + wd * p)`` and the distillation buffer ``m_kd * b + g_kd`` (weight decay counted
    once, with the task). A parameter that gets only one gradient (an adapter that only the distillation
    loss reaches) uses the mean momentum ``(m_task + m_kd) / 2`` and carries the weight decay itself. A buffer
    starts as its first gradient (the first distillation buffer without weight decay, as mdistiller's). The
    update is ``p -= lr * (b_task + b_kd)``.
    """

    def __init__(
        self, params: Iterable[nn.Parameter], lr: float, momentum: float, momentum_kd: float, weight_decay: float = 0
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("momentum_kd", momentum_kd), ("weight_decay",
                            weight_decay)):  # fmt: skip
            if value < 0:
                raise ValueError(f"DOT: {name} {value} must not be negative")
        super().__init__(params, {"lr": lr, "momentum": momentum, "momentum_kd": momentum_kd,
                                  "weight_decay": weight_decay})  # fmt: skip
        self._kd_grads: dict[nn.Parameter, torch.Tensor] = {}

    @torch.no_grad()
    def step_kd(self) -> None:
        """Keep the distillation gradients (the ``.grad`` now held); the update waits for :meth:`step`."""
        self._kd_grads = {p: p.grad for group in self.param_groups for p in group["params"] if p.grad is not None}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        """Update with the task gradients now in ``.grad`` and the distillation gradients kept by ``step_kd``."""
        if closure is not None:
            raise ValueError("DOT: closures are not supported")
        for group in self.param_groups:
            m_task, m_kd, wd, lr = group["momentum"], group["momentum_kd"], group["weight_decay"], group["lr"]
            m_mean = (m_task + m_kd) / 2
            for p in group["params"]:
                g_task, g_kd = p.grad, self._kd_grads.get(p)
                state = self.state[p]
                if g_task is not None:
                    d = g_task.add(p, alpha=wd) if wd else g_task
                    state["momentum_buffer"] = _accumulate(state.get("momentum_buffer"), d,
                                                           m_task if g_kd is not None else m_mean)  # fmt: skip
                if g_kd is not None:
                    own_decay = g_task is None and wd and "momentum_kd_buffer" in state
                    d = g_kd.add(p, alpha=wd) if own_decay else g_kd
                    state["momentum_kd_buffer"] = _accumulate(state.get("momentum_kd_buffer"), d,
                                                              m_kd if g_task is not None else m_mean)  # fmt: skip
                if g_task is not None:
                    p.add_(state["momentum_buffer"], alpha=-lr)
                if g_kd is not None:
                    p.add_(state["momentum_kd_buffer"], alpha=-lr)
        self._kd_grads = {}


def _accumulate(buf: torch.Tensor | None, d: torch.Tensor, momentum: float) -> torch.Tensor:
    """``momentum * buf + d`` in place, or a copy of ``d`` for the first step."""
    return d.detach().clone() if buf is None else buf.mul_(momentum).add_(d)


def dot_optimizer(modules: list[nn.Module], lr: float, args: argparse.Namespace) -> DistillationOrientedTrainer:
    """mdistiller's ``DOT.init_optimizer`` over the trainable parameters of ``modules`` (as ``helper.optim.sgd``):
    momenta ``--momentum -/+ --dot_delta``, SGD's weight decay."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return DistillationOrientedTrainer(
        params, lr=lr, momentum=args.momentum - args.dot_delta, momentum_kd=args.momentum + args.dot_delta,
        weight_decay=args.weight_decay,
    )  # fmt: skip
