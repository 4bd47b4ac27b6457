"""CRLD: "Cross-View Consistency Regularisation for Knowledge Distillation", Zhang, Liu, Cai and Ma, ACM MM 2024,
arXiv 2412.16493.

Loss: KD within each view (weak student vs weak teacher, strong vs strong) on the samples whose weak-view
teacher confidence reaches ``tau_w``, plus KD across the views (strong student vs weak teacher, weak vs strong)
on the samples whose strong-view teacher confidence reaches ``tau_s``: ``w_wv * within + w_cv * cross``.

Two protocols, as MLKD's:

* ``--two_views`` (the paper's, official ``CRLD`` distiller with ``get_dataset_strong``): every image comes as
  a weak and a strong view (:mod:`dataset.randaugment`), student and teacher see both, CE on both views with
  weight 1 each (``-r 1``; the engine sums CE over the views).
* one standard view (no flag): the same loss with the strong view equal to the weak one (CE ``-r 2``, the
  official ``CE_w + CE_s``); "CRLD loss, standard protocol", not a reproduction of the paper's numbers.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from .base import Distiller, Shapes, register

__all__ = ["crld_loss", "kd_per_sample", "teacher_confident"]


def kd_per_sample(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> torch.Tensor:
    """(B,): ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` per sample (official ``kd_loss``, reduce=False)."""
    log_p_s = F.log_softmax(z_s.float() / T, dim=1)  # (B, C)
    log_p_t = F.log_softmax(z_t.float() / T, dim=1)  # (B, C)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * T**2


def teacher_confident(z_t: torch.Tensor, tau: float) -> torch.Tensor:
    """(B,) float: 1 where the teacher's untempered top probability is ``>= tau`` (official ``conf.ge(tau)``)."""
    return (z_t.detach().float().softmax(dim=1).amax(dim=1) >= tau).float()


def crld_loss(
    weak: tuple[torch.Tensor, torch.Tensor],
    strong: tuple[torch.Tensor, torch.Tensor],
    T: float,
    tau_w: float,
    tau_s: float,
    w_wv: float,
    w_cv: float,
) -> torch.Tensor:
    """``w_wv * mean(m_w * (KD(s_w, t_w) + KD(s_s, t_s))) + w_cv * mean(m_s * (KD(s_s, t_w) + KD(s_w, t_s)))``.

    ``weak``/``strong`` = (student, teacher) logits (B, C). ``m_w`` is the weak teacher's confidence mask,
    ``m_s`` the strong teacher's, each applied as the official code does (``mask_w`` on both within-view terms,
    ``mask_s`` on both cross-view ones); means over the whole batch, masked samples counting 0.
    """
    (s_w, t_w), (s_s, t_s) = weak, strong
    m_w, m_s = teacher_confident(t_w, tau_w), teacher_confident(t_s, tau_s)  # (B,) each
    within = ((kd_per_sample(s_w, t_w, T) + kd_per_sample(s_s, t_s, T)) * m_w).mean()
    cross = ((kd_per_sample(s_s, t_w, T) + kd_per_sample(s_w, t_s, T)) * m_s).mean()
    return w_wv * within + w_cv * cross


@register
class CRLDDistiller(Distiller):
    """CRLD on two views with ``--two_views`` (the paper's protocol) or on one standard view.

    Defaults: official ``mdistiller/engine/cfg.py`` ``CFG.CRLD`` (``CE_WEIGHT 1`` per view, ``WV_WEIGHT 2``,
    ``CV_WEIGHT 0.5``, ``TEMPERATURE 4``, ``TAU_W 0.9``, ``TAU_S 0.2``; no warm-up); its per-pair configs
    (``configs/cifar100/crld/*.yaml``) change only the learning rate (0.01 for MobileNetV2/ShuffleV2), 240
    epochs, batch 64, weight decay 5e-4. ``-b`` multiplies this term (1).
    """

    name = "crld"
    paper = "Cross-View Consistency Regularisation for Knowledge Distillation (ACM MM 2024, arXiv 2412.16493)"
    defaults = {"gamma": 2.0, "alpha": 0.0, "beta": 1.0}
    two_views = True

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.settings = (args.crld_T, args.crld_tau_w, args.crld_tau_s, args.crld_wv, args.crld_cv)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("CRLD")
        group.add_argument("--crld_T", type=float, default=4.0, help="CRLD: temperature (official: 4)")
        group.add_argument("--crld_tau_w", type=float, default=0.9, help="CRLD: within-view confidence threshold (0.9)")
        group.add_argument("--crld_tau_s", type=float, default=0.2, help="CRLD: cross-view confidence threshold (0.2)")
        group.add_argument("--crld_wv", type=float, default=2.0, help="CRLD: weight of the within-view term (2)")
        group.add_argument("--crld_cv", type=float, default=0.5, help="CRLD: weight of the cross-view term (0.5)")

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        one = (out_s.logits, out_t.logits)  # (B, C) each
        return crld_loss(one, one, *self.settings)

    def forward_views(self, outs_s: tuple[Any, Any], outs_t: tuple[Any, Any], batch: Any) -> torch.Tensor:
        weak = (outs_s[0].logits, outs_t[0].logits)  # (B, C) each
        strong = (outs_s[1].logits, outs_t[1].logits)
        return crld_loss(weak, strong, *self.settings)
