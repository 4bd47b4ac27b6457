"""DKD: "Decoupled Knowledge Distillation", Zhao, Cui, Song, Qiu and Liang, CVPR 2022, arXiv 2203.08679.

Loss: KD split into a target-class term (TCKD, the KL between the teacher's and student's binary
target/non-target distributions) and a non-target term (NCKD, the KL between their distributions over the
non-target classes), re-weighted as ``alpha * TCKD + beta * NCKD`` and ramped up linearly over 20 epochs.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .base import Distiller, Shapes, register
from .logit_modifiers import add_modifier_arguments, build_modifier

__all__ = ["dkd_loss", "dkd_terms", "linear_warmup", "warmup_epochs"]


def linear_warmup(epoch: int, warmup_epochs: float) -> float:
    """``min(epoch / warmup_epochs, 1)`` for the 1-based epoch (mdistiller ``DKD.forward_train`` and
    ``ReviewKD.forward_train``: ``min(kwargs["epoch"] / warmup, 1.0)``, epochs counted from 1). No warm-up
    when ``warmup_epochs <= 0``."""
    return 1.0 if warmup_epochs <= 0 else min(epoch / warmup_epochs, 1.0)


def dkd_terms(
    z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, T: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD, both multiplied by ``T^2`` as KD is, shapes (B,) and (B,).

    TCKD compares ``b = (p_target, 1 - p_target)`` of the softened distributions; NCKD compares the
    softened distributions over the C - 1 non-target classes (the paper's p-hat). Together they decompose
    KD exactly (paper eq. 1-4): ``KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD``.

    Log-space throughout (mdistiller takes ``torch.log`` of summed probabilities, which underflows for
    confident students); the target logit is masked to -inf instead of being pushed down by 1000.
    """
    z_s, z_t = z_s.float(), z_t.float()
    # A comparison, not F.one_hot: one_hot checks the targets' range on the host.
    gt = target[:, None] == torch.arange(z_s.shape[1], device=z_s.device)  # (B, C)
    log_p_s = F.log_softmax(z_s / T, dim=1)  # (B, C)
    log_p_t = F.log_softmax(z_t / T, dim=1)  # (B, C)

    # Masks as where/masked_fill, never as indices: boolean-mask indexing needs the mask's count on the host.
    def binary(log_p: torch.Tensor) -> torch.Tensor:  # (B, 2): log p_target, log(1 - p_target)
        target_term = torch.where(gt, log_p, 0.0).sum(dim=1)  # adding zeros: exactly log_p[target]
        return torch.stack([target_term, log_p.masked_fill(gt, float("-inf")).logsumexp(dim=1)], dim=1)

    def non_target(z: torch.Tensor) -> torch.Tensor:  # (B, C): log-softmax over the C - 1 others, 0 at target
        # The target's logit at -inf drops it from the softmax; 0 after keeps the products below finite.
        return F.log_softmax((z / T).masked_fill(gt, float("-inf")), dim=1).masked_fill(gt, 0.0)

    log_b_s, log_b_t = binary(log_p_s), binary(log_p_t)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1)  # (B,)
    log_q_s, log_q_t = non_target(z_s), non_target(z_t)  # (B, C)
    q_t = log_q_t.exp().masked_fill(gt, 0.0)  # (B, C), the teacher's p-hat
    nckd = (q_t * (log_q_t - log_q_s)).sum(dim=1)  # (B,)
    return tckd * T**2, nckd * T**2


def dkd_loss(
    z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, T: torch.Tensor | float
) -> torch.Tensor:
    """``alpha * TCKD + beta * NCKD``, averaged over the batch (mdistiller ``dkd_loss``)."""
    tckd, nckd = dkd_terms(z_s, z_t, target, T)
    return (alpha * tckd + beta * nckd).mean()


def warmup_epochs(args: Any) -> float:
    """``--dkd_warmup``, else mdistiller's 20 epochs (``CFG.DKD.WARMUP``), or none with ``--ctkd``: CTKD's
    ``helper/loops.py`` applies ``criterion_kd`` (its ``DKDloss``) at full weight from the first epoch."""
    if args.dkd_warmup is not None:
        return args.dkd_warmup
    return 0.0 if args.ctkd else 20.0


@register
class DKDDistiller(Distiller):
    """DKD on the logits, with the warm-up as a factor on the whole term.

    Defaults (mdistiller ``mdistiller/engine/cfg.py``, ``CFG.DKD``): ``--dkd_alpha 1``, ``--dkd_beta 8``,
    ``--dkd_T 4``, a warm-up of 20 epochs (none under ``--ctkd``: :func:`warmup_epochs`), CE weight 1.
    mdistiller's per-pair configs (``configs/cifar100/dkd/*.yaml``) lower beta for six pairs:
    ``helper/published/recipes.csv`` holds them, ``scripts/run_cifar_newer.sh`` passes them.

    Recipe: the engine's ``-b`` multiplies this term (default 1), ``-a`` (default 0) adds the plain KD term,
    ``-r`` is the CE weight (default 1, mdistiller's ``DKD.CE_WEIGHT``). mdistiller trains DKD
    with SGD 0.05 (0.01 for MobileNetV2/ShuffleNets), batch 64, 240 epochs, decay x0.1 at 150/180/210, weight
    decay 5e-4: the same schedule as RepDistiller's, so our default recipe is DKD's. mdistiller reports the
    best test epoch, the engine reports the last and the best.

    With ``--logit_stand``/``--ctkd`` the logits are modified and ``--dkd_T`` is replaced (by ``--base_temp``
    or the learned temperature), as LS-KD's DKD and CTKD's ``DKDloss`` do.
    """

    name = "dkd"
    paper = "Decoupled Knowledge Distillation (CVPR 2022, arXiv 2203.08679)"
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.alpha, self.beta, self.T = args.dkd_alpha, args.dkd_beta, args.dkd_T
        self.warmup_epochs = warmup_epochs(args)
        self.warmup = 1.0  # until the engine's first set_epoch
        self.modifier = build_modifier(args, args.dkd_T)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("DKD")
        group.add_argument("--dkd_alpha", type=float, default=1.0, help="DKD: weight of TCKD (mdistiller: 1)")
        group.add_argument("--dkd_beta", type=float, default=8.0, help="DKD: weight of NCKD (mdistiller: 8)")
        group.add_argument("--dkd_T", type=float, default=4.0, help="DKD: temperature (mdistiller: 4)")
        group.add_argument(
            "--dkd_warmup", type=float, default=None,
            help="DKD: linear warm-up epochs (default: mdistiller's 20; 0 with --ctkd, as CTKD's DKD has none)",
        )  # fmt: skip
        add_modifier_arguments(parser)

    def set_epoch(self, epoch: int, stage: str) -> None:
        self.warmup = linear_warmup(epoch, self.warmup_epochs)
        if self.modifier is not None:
            self.modifier.set_epoch(epoch, stage)

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        z_s, z_t, T = out_s.logits, out_t.logits, self.T  # (B, C) each
        if self.modifier is not None:
            z_s, z_t, T = self.modifier(z_s, z_t)
        return self.warmup * dkd_loss(z_s, z_t, batch.target, self.alpha, self.beta, T)
