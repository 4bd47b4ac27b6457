"""LumiNet: "LumiNet: Perception-Driven Knowledge Distillation via Statistical Logit Calibration" (earlier title
"LumiNet: The Bright Side of Perceptual Knowledge Distillation"), Hossain et al., arXiv 2310.03669 (2023).

Loss: every class's logit is standardised over the batch ("perception": minus the batch mean of that class,
over the batch standard deviation), then KD's KL between the softened teacher and student distributions of the
standardised logits, weighted by ``alpha^2``, ramped up linearly over 20 epochs.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .base import Distiller, Shapes, register
from .DKD import linear_warmup

__all__ = ["luminet_loss", "perception"]


def perception(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``(z - mean_B(z)) / sqrt(var_B(z) + eps)`` per class over the batch (B, C); biased variance.

    As the official ``mdistiller/distillers/Luminet.py`` ``perception`` (``torch.var(..., unbiased=False)``,
    ``epsilon=1e-5`` inside the square root): a BatchNorm without affine parameters, in training mode. The
    statistics are those of the batch the loss sees: one process's share under distributed training, as one
    replica's share under the official ``DataParallel``. A batch of one image standardises to 0 (no loss).
    """
    z = z.float()
    mean = z.mean(dim=0, keepdim=True)  # (1, C)
    var = z.var(dim=0, keepdim=True, unbiased=False)  # (1, C)
    return (z - mean) / torch.sqrt(var + eps)


def luminet_loss(z_s: torch.Tensor, z_t: torch.Tensor, T: float, alpha: float) -> torch.Tensor:
    """``alpha^2 * KL(softmax(perception(z_t) / T) || softmax(perception(z_s) / T))``, batch mean.

    The official ``luminet_loss`` scales the KL by ``alpha**2`` (``nckd_loss *= alpha**2``), not by KD's
    ``T^2``: ``alpha`` is the per-pair weight of its configs (``SOLVER.ALPHA``, 31 to 75).
    """
    log_p_s = F.log_softmax(perception(z_s) / T, dim=1)  # (B, C)
    log_p_t = F.log_softmax(perception(z_t) / T, dim=1)  # (B, C)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean() * alpha**2


@register
class LumiNetDistiller(Distiller):
    """LumiNet on the logits, with the official warm-up as a factor on the whole term.

    Defaults: official ``mdistiller/engine/cfg.py`` (``SOLVER.CE_WEIGHT 2``, ``SOLVER.ALPHA 31``,
    ``SOLVER.T 4``, ``LUMINET.WARMUP 20``); its per-pair configs (``configs/cifar100/luminet/*.yaml``) set
    alpha, T and the CE weight for six pairs: ``scripts/run_cifar_newer.sh`` passes them. ``-r`` is the CE
    weight, ``-b`` multiplies this term (1), ``-a`` (0) adds plain KD.
    """

    name = "luminet"
    paper = (
        "LumiNet: Perception-Driven Knowledge Distillation via Statistical Logit Calibration (arXiv 2310.03669, 2023)"
    )
    defaults = {"gamma": 2.0, "alpha": 0.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.alpha, self.T, self.warmup_epochs = args.luminet_alpha, args.luminet_T, args.luminet_warmup
        self.warmup = 1.0  # until the engine's first set_epoch

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("LumiNet")
        group.add_argument("--luminet_alpha", type=float, default=31.0, help="LumiNet: the term is alpha^2 x KL (31)")
        group.add_argument("--luminet_T", type=float, default=4.0, help="LumiNet: temperature (official: 4)")
        group.add_argument("--luminet_warmup", type=float, default=20, help="LumiNet: linear warm-up epochs (20)")

    def set_epoch(self, epoch: int, stage: str) -> None:
        self.warmup = linear_warmup(epoch, self.warmup_epochs)

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return self.warmup * luminet_loss(out_s.logits, out_t.logits, self.T, self.alpha)  # logits (B, C)
