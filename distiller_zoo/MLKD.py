"""MLKD: "Multi-Level Logit Distillation", Jin, Wang and Lin, CVPR 2023 (CVF open access; no arXiv version).

Loss: the student's softened predictions are aligned with the teacher's at three levels, each at five
temperatures: instance level (KL per sample), batch level (the B x B Gram matrix of the predictions) and class
level (the C x C Gram matrix), the last two by squared error.

Two protocols:

* ``--two_views`` (the paper's, official ``AugTrainer`` + ``KD_ours``): every image comes as a weak view
  (crop + flip) and a strong one (crop + flip + RandAugment(2) + Cutout, :mod:`dataset.randaugment`); student
  and teacher see both; CE on both views with weight 0.1 each (``-r 0.1``). Its configs train 240 epochs at
  lr 0.025 (same-family pairs) and 480 epochs at lr 0.01 / 0.0025 (cross-family); run folders get ``_2v``.
* one standard view (no flag): MLKD's loss with the strong view equal to the weak one, under RepDistiller's
  protocol. Results are "MLKD loss, standard protocol", not a reproduction of the paper's numbers.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .base import Distiller, Shapes, register
from .logit_modifiers import add_modifier_arguments, build_modifier, softened_kl

__all__ = ["batch_level_loss", "class_level_loss", "confidence_fraction", "mlkd_loss", "mlkd_two_view_loss"]

# The temperatures next to the configured one (KD.TEMPERATURE, 4): hard-coded in the official
# ``mdistiller/distillers/KD_ours.py`` (3.0, 5.0, 2.0, 6.0).
EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


def batch_level_loss(z_s: torch.Tensor, z_t: torch.Tensor, T: torch.Tensor | float) -> torch.Tensor:
    """``sum((G_t - G_s)^2) / B`` with ``G = P P^T`` (B, B), ``P = softmax(z / T)`` (KD_ours ``bc_loss``)."""
    p_s, p_t = (z_s.float() / T).softmax(dim=1), (z_t.float() / T).softmax(dim=1)  # (B, C)
    return ((p_t @ p_t.t() - p_s @ p_s.t()) ** 2).sum() / z_s.shape[0]


def class_level_loss(z_s: torch.Tensor, z_t: torch.Tensor, T: torch.Tensor | float) -> torch.Tensor:
    """``sum((M_t - M_s)^2) / C`` with ``M = P^T P`` (C, C), ``P = softmax(z / T)`` (KD_ours ``cc_loss``)."""
    p_s, p_t = (z_s.float() / T).softmax(dim=1), (z_t.float() / T).softmax(dim=1)  # (B, C)
    return ((p_t.t() @ p_t - p_s.t() @ p_s) ** 2).sum() / z_s.shape[1]


def confidence_fraction(z_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors that KD_ours's confidence masks reduce to: (sample fraction, class fraction).

    The official code thresholds the teacher's confidence at its median (``np.percentile(.., 50)``, linear
    interpolation, as ``torch.quantile``) and multiplies the already batch-averaged losses by the boolean
    mask before ``.mean()`` (its ``reduce=False`` is commented out), so each mask only scales its loss by the
    fraction of samples (classes) at or below the median: about 1/2. Computed here exactly, on the device.
    """
    p_t = z_t.detach().float().softmax(dim=1)  # (B, C), untempered as in KD_ours
    confidence = p_t.max(dim=1).values  # (B,)
    class_confidence = p_t.sum(dim=0)  # (C,)
    sample_fraction = (confidence <= torch.quantile(confidence, 0.5)).float().mean()
    class_fraction = (class_confidence <= torch.quantile(class_confidence, 0.5)).float().mean()
    return sample_fraction, class_fraction


def mlkd_loss(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    temperatures: tuple[torch.Tensor | float, ...],
    instance_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Official MLKD loss (without CE and without the KD weight) for one view used as both views.

    KD_ours, with the strong view equal to the weak one, sums over the temperatures ``T``:
    instance ``(1 + m) * KD_T`` (weak view x mask ``m`` plus strong view), class level ``m_c * CC_T`` and batch
    level ``m * BC_T`` (the strong-view class/batch terms are computed there but not returned in its loss
    dict, so they do not train). ``instance_inputs`` are the logits for the instance term when they differ
    (LS-KD standardises only those).
    """
    m, m_c = confidence_fraction(z_t)
    zi_s, zi_t = instance_inputs if instance_inputs is not None else (z_s, z_t)
    total = z_s.new_zeros((), dtype=torch.float32)
    for T in temperatures:
        total = total + (1 + m) * softened_kl(zi_s, zi_t, T).mean()
        total = total + m_c * class_level_loss(z_s, z_t, T) + m * batch_level_loss(z_s, z_t, T)
    return total


# KD_ours's strong-view instance terms at T = 2 and 6 read the weak view's logits (the lines were copied from
# the weak block): positions 3 and 4 of (T, 3, 5, 2, 6). Reproduced by default; --mlkd_strong_terms strong
# uses the strong view at all five temperatures.
WEAK_IN_STRONG_BLOCK = (3, 4)


def mlkd_two_view_loss(
    weak: tuple[torch.Tensor, torch.Tensor],
    strong: tuple[torch.Tensor, torch.Tensor],
    temperatures: tuple[torch.Tensor | float, ...],
    official_mix: bool = True,
    instance: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Official two-view MLKD loss (without CE and the KD weight); ``weak``/``strong`` = (student, teacher) logits.

    KD_ours: with the masks' fractions ``m`` (samples) and ``m_c`` (classes) from the teacher's weak view,
    ``sum_T [m * KD_T(weak) + KD_T(strong) + m_c * CC_T(weak) + m * BC_T(weak)]``; the strong view's class and
    batch terms are computed there but not returned, so they do not train. ``official_mix``: the strong
    block's T = 2 and 6 instance terms use the weak view, as in KD_ours. ``instance``: the (weak, strong)
    logits for the instance terms when they differ (logit standardisation).
    """
    zs_w, zt_w = weak
    m, m_c = confidence_fraction(zt_w)
    (iw_s, iw_t), (is_s, is_t) = instance if instance is not None else (weak, strong)
    total = zs_w.new_zeros((), dtype=torch.float32)
    for i, T in enumerate(temperatures):
        total = total + m * softened_kl(iw_s, iw_t, T).mean()
        from_weak = official_mix and i in WEAK_IN_STRONG_BLOCK
        total = total + (softened_kl(iw_s, iw_t, T) if from_weak else softened_kl(is_s, is_t, T)).mean()
        total = total + m_c * class_level_loss(zs_w, zt_w, T) + m * batch_level_loss(zs_w, zt_w, T)
    return total


@register
class MLKDDistiller(Distiller):
    """MLKD's loss, on two views with ``--two_views`` (the paper's protocol) or on one standard view.

    Temperatures ``(--mlkd_T, 3, 5, 2, 6)`` with ``--mlkd_T 4`` (KD_ours: ``cfg.KD.TEMPERATURE`` = 4 and the
    hard-coded others). Weights: KD_ours multiplies every term by ``KD.LOSS.KD_WEIGHT`` 0.9 (``-b 0.9``) and its
    CE is ``0.1 * (CE_weak + CE_strong)``: ``-r 0.1`` with ``--two_views`` (the engine sums CE over the views),
    ``-r 0.2`` for one view used twice (the default). Official learning rate 0.025 for the 240-epoch configs
    (``configs/cifar100/ours/*.yaml``; the recipe script passes it and the 480-epoch ones).

    With ``--logit_stand`` (LS-KD ``mdistiller/distillers/MLKD.py``): only the instance-level logits are
    standardised, ``--mlkd_T`` is replaced by ``--base_temp`` and LS-KD's kd-weight 9 is ``-b 9``. With
    ``--ctkd`` the learned temperature replaces ``--mlkd_T`` (no official MLKD+CTKD exists).
    """

    name = "mlkd"
    paper = "Multi-Level Logit Distillation (CVPR 2023; no arXiv version)"
    defaults = {"gamma": 0.2, "alpha": 0.0, "beta": 0.9}
    two_views = True

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.T = args.mlkd_T
        self.official_mix = args.mlkd_strong_terms == "official"
        self.modifier = build_modifier(args, args.mlkd_T)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("MLKD")
        group.add_argument(
            "--mlkd_T", type=float, default=4.0, help="MLKD: first of its temperatures (others 3, 5, 2, 6)"
        )
        group.add_argument(
            "--mlkd_strong_terms", type=str, default="official", choices=["official", "strong"],
            help="MLKD --two_views: 'official' keeps KD_ours's T=2 and 6 strong-block terms on the weak view; "
            "'strong' uses the strong view at every temperature",
        )  # fmt: skip
        add_modifier_arguments(parser)

    def set_epoch(self, epoch: int, stage: str) -> None:
        if self.modifier is not None:
            self.modifier.set_epoch(epoch, stage)

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        z_s, z_t = out_s.logits, out_t.logits  # (B, C) each
        if self.modifier is None:
            return mlkd_loss(z_s, z_t, (self.T, *EXTRA_TEMPERATURES))
        zi_s, zi_t, T = self.modifier(z_s, z_t)
        return mlkd_loss(z_s, z_t, (T, *EXTRA_TEMPERATURES), instance_inputs=(zi_s, zi_t))

    def forward_views(self, outs_s: tuple[Any, Any], outs_t: tuple[Any, Any], batch: Any) -> torch.Tensor:
        weak = (outs_s[0].logits, outs_t[0].logits)  # (B, C) each
        strong = (outs_s[1].logits, outs_t[1].logits)
        if self.modifier is None:
            return mlkd_two_view_loss(weak, strong, (self.T, *EXTRA_TEMPERATURES), self.official_mix)
        iw_s, iw_t, T = self.modifier(*weak)
        is_s, is_t, _ = self.modifier(*strong)
        return mlkd_two_view_loss(
            weak, strong, (T, *EXTRA_TEMPERATURES), self.official_mix, instance=((iw_s, iw_t), (is_s, is_t))
        )
