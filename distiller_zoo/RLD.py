"""RLD: "Knowledge Distillation with Refined Logits", Sun, Chen, Lyu, Chen, Chen and Wang, ICCV 2025,
arXiv 2408.07703.

Loss: sample confidence distillation (SCD), a KL between the student's binary (target, rest) distribution and
the teacher's binary (teacher's top class, rest) one, plus masked correlation distillation (MCD), KD over the
classes that the teacher ranks strictly below the true class (the true class and every class the teacher
prefers to it are masked out of both distributions), ``alpha * SCD + beta * MCD``, ramped up over 20 epochs.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .base import Distiller, Shapes, register
from .DKD import linear_warmup

__all__ = ["rld_loss", "rld_terms"]

# The official code fills masked logits with -1e9 (after dividing by T) rather than -inf: a sample whose true
# class the teacher ranks last has every class masked and gets a uniform distribution on both sides (MCD 0)
# instead of NaN. Kept for that case.
MASKED = -1e9


def binary_log(log_p: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, 2): ``log p[index]`` and ``log(1 - p[index])`` (as a log-sum-exp of the other classes)."""
    # A comparison, not F.one_hot: one_hot checks the index values on the host (a device sync per step).
    at = torch.arange(log_p.shape[1], device=log_p.device)[None, :] == index[:, None]  # (B, C)
    picked = log_p.gather(1, index[:, None])[:, 0]  # (B,)
    return torch.stack([picked, log_p.masked_fill(at, float("-inf")).logsumexp(dim=1)], dim=1)


def rld_terms(
    z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, T: float, alpha_T: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-mean SCD (times ``alpha_T^2``) and MCD (times ``T^2``), as the official ``rld_loss``.

    SCD: the student's pair is split at the true class, the teacher's at its own arg-max (official
    ``_get_gt_mask(logits_teacher, max_index)``), both at temperature ``alpha_T``. MCD: the mask is
    ``z_t >= z_t[target]`` (official ``_get_ge_mask``), which always holds the true class itself.
    Log-space (the official code takes ``torch.log`` of summed probabilities; equal up to rounding).
    """
    z_s, z_t = z_s.float(), z_t.float()
    log_b_s = binary_log(F.log_softmax(z_s / alpha_T, dim=1), target)  # (B, 2)
    log_b_t = binary_log(F.log_softmax(z_t / alpha_T, dim=1), z_t.argmax(dim=1))  # (B, 2)
    scd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1).mean() * alpha_T**2
    mask = z_t >= z_t.gather(1, target[:, None])  # (B, C)
    log_q_s = F.log_softmax((z_s / T).masked_fill(mask, MASKED), dim=1)  # (B, C)
    log_q_t = F.log_softmax((z_t / T).masked_fill(mask, MASKED), dim=1)  # (B, C)
    # Masked classes: q_t = exp(-1e9 - lse) = 0 and finite log-probabilities on both sides, so they add 0.
    mcd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1).mean() * T**2
    return scd, mcd


def rld_loss(
    z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, T: float, alpha_T: float
) -> torch.Tensor:
    """``alpha * SCD + beta * MCD`` (official ``rld_loss`` without logit standardisation)."""
    scd, mcd = rld_terms(z_s, z_t, target, T, alpha_T)
    return alpha * scd + beta * mcd


@register
class RLDDistiller(Distiller):
    """RLD on the logits, with the official warm-up as a factor on the whole term.

    Defaults: official ``mdistiller/engine/cfg.py`` ``CFG.RLD`` (``CE_WEIGHT 1``, ``ALPHA 1``, ``BETA 8``,
    ``T 4``, ``ALPHA_T 1``, ``WARMUP 20``); its per-pair configs (``configs/cifar100/rld/*.yaml``) change only
    the learning rate (0.01 for MobileNetV2/ShuffleV2 students), as RepDistiller's schedule does. The README's
    example command adds ``--same-t`` (``ALPHA_T = T``): ``--rld_alpha_T 4``. ``-r`` is the CE weight, ``-b``
    multiplies this term (1), ``-a`` (0) adds plain KD.
    """

    name = "rld"
    paper = "Knowledge Distillation with Refined Logits (ICCV 2025, arXiv 2408.07703)"
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.alpha, self.beta, self.T, self.alpha_T = args.rld_alpha, args.rld_beta, args.rld_T, args.rld_alpha_T
        self.warmup_epochs = args.rld_warmup
        self.warmup = 1.0  # until the engine's first set_epoch

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("RLD")
        group.add_argument("--rld_alpha", type=float, default=1.0, help="RLD: weight of SCD (official: 1)")
        group.add_argument("--rld_beta", type=float, default=8.0, help="RLD: weight of MCD (official: 8)")
        group.add_argument("--rld_T", type=float, default=4.0, help="RLD: temperature of MCD (official: 4)")
        group.add_argument("--rld_alpha_T", type=float, default=1.0, help="RLD: temperature of SCD (official: 1)")
        group.add_argument("--rld_warmup", type=float, default=20, help="RLD: linear warm-up epochs (official: 20)")

    def set_epoch(self, epoch: int, stage: str) -> None:
        self.warmup = linear_warmup(epoch, self.warmup_epochs)

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        z_s, z_t = out_s.logits, out_t.logits  # (B, C) each
        return self.warmup * rld_loss(z_s, z_t, batch.target, self.alpha, self.beta, self.T, self.alpha_T)
