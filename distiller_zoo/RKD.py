"""RKD: "Relational Knowledge Distillation", Park, Kim, Lu and Cho, CVPR 2019, arXiv 1904.05068.

Loss: Smooth-L1 between the student's and teacher's mean-normalised pairwise distance matrices
(distance-wise term) plus Smooth-L1 between their matrices of angles formed by every triple of samples
(angle-wise term), weighted 25 and 50.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Distiller, Shapes, register

__all__ = ["RKDLoss"]

# Squared distances are clamped here before the square root (RepDistiller's ``pdist``), so every
# off-diagonal distance is at least 1e-6 and the mean of the positive entries is the off-diagonal mean.
_SQ_EPS = 1e-12


def _gram_and_sq_dist(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix and squared pairwise distances (unclamped) of the rows of ``e`` (B, D).

    The rows are centred first: distances and the angles built from them do not change, but the Gram
    entries become small, so ``|a|^2 + |b|^2 - 2 a.b`` loses far less to cancellation (pooled post-ReLU
    features share a large common component).
    """
    e = e - e.mean(0, keepdim=True)
    gram = e @ e.t()  # (B, B)
    sq_norm = gram.diagonal()
    return gram, sq_norm.unsqueeze(1) + sq_norm.unsqueeze(0) - 2 * gram


def _normalised_distances(sq: torch.Tensor) -> torch.Tensor:
    """Pairwise distances (zero diagonal) divided by the mean off-diagonal distance. (B, B)"""
    b = sq.shape[0]
    off_diag = ~torch.eye(b, dtype=torch.bool, device=sq.device)
    d = sq.clamp(min=_SQ_EPS).sqrt() * off_diag
    # d.sum() / count instead of d[d > 0].mean(): the same value (off-diagonal entries are >= 1e-6),
    # without a device-to-host sync for the boolean index.
    return d / (d.sum() / (b * b - b))


def _angles(gram: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """``cos`` of the angle at vertex a between samples b and c, for every triple: (B, B, B).

    ``<e_b - e_a, e_c - e_a> = G_bc - G_ab - G_ac + G_aa``, divided by ``|e_b - e_a| |e_c - e_a|``;
    zero where b or c coincides with a (RepDistiller normalises a zero vector to zero). This costs
    O(B^2 D + B^3) instead of building the (B, B, D) difference tensor and a batched matmul over it.
    """
    b = gram.shape[0]
    inner = gram.unsqueeze(0) - gram.unsqueeze(2) - gram.unsqueeze(1) + gram.diagonal().view(b, 1, 1)
    dist = sq.clamp(min=_SQ_EPS).sqrt()  # (B, B), dist[a, b] = |e_b - e_a|
    apart = (sq > _SQ_EPS) & ~torch.eye(b, dtype=torch.bool, device=sq.device)  # e_b != e_a
    valid = apart.unsqueeze(2) & apart.unsqueeze(1)  # (B, B, B): both b and c differ from a
    cos = inner / (dist.unsqueeze(2) * dist.unsqueeze(1))
    return torch.where(valid, cos, torch.zeros_like(cos))


class RKDLoss(nn.Module):
    """``w_d * L_distance + w_a * L_angle`` on flattened features (B, ...) of student and teacher.

    ``w_d = 25, w_a = 50`` are RepDistiller's defaults; their 1:2 ratio is the paper's
    (lambda_D = 1, lambda_A = 2, section 4.1). The teacher's relations carry no gradient.
    """

    def __init__(self, w_d: float = 25, w_a: float = 50) -> None:
        super().__init__()
        self.w_d = w_d
        self.w_a = w_a

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        # float32 outside autocast: the relations are differences of Gram entries.
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            student = f_s.float().flatten(1)  # (B, D_s)
            teacher = f_t.float().flatten(1)  # (B, D_t)
            with torch.no_grad():
                gram_t, sq_t = _gram_and_sq_dist(teacher)
                dist_t, angle_t = _normalised_distances(sq_t), _angles(gram_t, sq_t)
            gram_s, sq_s = _gram_and_sq_dist(student)
            loss_d = F.smooth_l1_loss(_normalised_distances(sq_s), dist_t)
            loss_a = F.smooth_l1_loss(_angles(gram_s, sq_s), angle_t)
            return self.w_d * loss_d + self.w_a * loss_a


@register
class RKDDistiller(Distiller):
    """RKD on the pooled vectors, ``feats[-1]``."""

    name = "rkd"
    paper = "Relational Knowledge Distillation (CVPR 2019, arXiv 1904.05068)"
    # run_cifar_distill.sh: --distill rkd -a 0 -b 1
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.rkd = RKDLoss()

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return self.rkd(out_s.feats[-1], out_t.feats[-1])
