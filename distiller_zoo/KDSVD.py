"""KD-SVD: Lee, Kim and Song, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition", ECCV 2018, arXiv 1807.06819.

Loss in words: compress each stage map to its leading right-singular vectors (one per channel set),
align the student's to the teacher's, and match the RBF correlations between consecutive stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Distiller, PairError, Shapes, register

__all__ = ["KDSVD", "KDSVDDistiller"]


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class KDSVD(nn.Module):
    """RepDistiller's ``KDSVD(k=1)``; ``forward(g_s, g_t)`` returns one loss per pair of consecutive maps.

    Per stage, a map (B, C, H, W) becomes the matrix (B, HW, C) and its SVD gives right-singular vectors
    V (B, C, r). The teacher keeps its top ``k``, the student its top ``k + 3``, each student vector set
    replaced by the one with the largest |cosine| to each teacher vector, sign-corrected (SVD signs are
    arbitrary). Both sets are scaled by the teacher's L2-normalised top-``k`` singular values. For stages
    i > 0, ``rbf[c, c'] = exp(-(v_i[c] - v_(i-1)[c'])^2 / 8)`` (B, C_i, C_(i-1), k); the loss is
    ``sum (rbf_s - rbf_t)^2 / B`` with non-finite entries set to 0. The ``k + 3`` candidates and the RBF
    width 8 come from the authors' TensorFlow code (sseung0703/SSKD_SVD), as ported by RepDistiller.

    Student and teacher maps of a stage must have equal channel counts (the cosines compare channel
    vectors); spatial sizes may differ. RepDistiller reshapes with ``H * H`` (square maps only); this uses
    ``H * W``, identical for square maps. ``torch.linalg.svd`` returns ``Vh``; its transpose is the ``V``
    of the deprecated ``torch.svd`` that RepDistiller calls, computed by the same LAPACK routine.
    """

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.k = k

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        losses = []
        v_s_prev = v_t_prev = None
        for f_s, f_t in zip(g_s, g_t):
            s_t, v_t = self.svd(f_t, self.k)  # (B, k), (B, C, k)
            _, v_s = self.svd(f_s, self.k + 3)  # (B, C, k + 3)
            v_s = self.align_rsv(v_s, v_t)  # (B, C, k)
            v_t = v_t * s_t.unsqueeze(1)
            v_s = v_s * s_t.unsqueeze(1)
            if v_s_prev is not None:
                rbf_s = torch.exp(-(v_s.unsqueeze(2) - v_s_prev.unsqueeze(1)).pow(2) / 8)  # (B, C_i, C_i-1, k)
                rbf_t = torch.exp(-(v_t.unsqueeze(2) - v_t_prev.unsqueeze(1)).pow(2) / 8)
                losses.append(finite_or_zero((rbf_s - rbf_t.detach()).pow(2)).sum())
            v_s_prev, v_t_prev = v_s, v_t
        return [loss / g_s[0].shape[0] for loss in losses]

    @staticmethod
    def svd(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``n`` singular values (L2-normalised) and right-singular vectors of a (B, C, H, W) map."""
        # LAPACK has no half-precision SVD: run it in fp32 under autocast too.
        x = feat.flatten(2).transpose(1, 2).float()  # (B, HW, C)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)  # s (B, r), vh (B, r, C), r = min(HW, C)
        v = finite_or_zero(vh.transpose(1, 2))  # (B, C, r)
        s = finite_or_zero(s)
        return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)

    @staticmethod
    def align_rsv(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
        """For each teacher vector, the student vector of largest |cosine|, with the cosine's sign.

        v_s (B, C, n_s), v_t (B, C, n_t) -> (B, C, n_t). Ties add up, as in RepDistiller.
        """
        cosine = torch.bmm(v_s.transpose(1, 2), v_t)  # (B, n_s, n_t)
        best = cosine.abs().amax(dim=1, keepdim=True)  # (B, 1, n_t)
        mask = torch.where(cosine.abs() == best, cosine.sign(), torch.zeros_like(cosine))
        return torch.bmm(v_s, mask)


def check_kdsvd_shapes(s_shapes: Shapes, t_shapes: Shapes) -> None:
    """Raise :class:`PairError` unless each zipped pair of stage maps has equal channel counts."""
    if min(len(s_shapes), len(t_shapes)) < 2:
        # The loss compares consecutive stages: with one stage it would be identically 0.
        raise PairError(
            f"kdsvd needs at least two stage maps in both nets; student has {len(s_shapes)}, teacher {len(t_shapes)}"
        )
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes), start=1):
        if len(s) != 3 or len(t) != 3:
            raise PairError(f"kdsvd: feature {i} is not a (C, H, W) map: student {tuple(s)}, teacher {tuple(t)}")
        if s[0] != t[0]:
            raise PairError(
                f"kdsvd compares singular vectors over channels, so student and teacher need equal channel "
                f"counts; feature {i} has {s[0]} in the student ({tuple(s)}) and {t[0]} in the teacher "
                f"({tuple(t)})"
            )


@register
class KDSVDDistiller(Distiller):
    """``--distill kdsvd``: KDSVD summed over the stage maps ``feats[1:-1]`` (zipped, as RepDistiller).

    RepDistiller has no script line or result for kdsvd. The default ``beta = 1`` is the feature weight
    of mdistiller's port of the same loss (``CFG.KDSVD.LOSS.FEAT_WEIGHT = 1.0``, CE weight 1.0); the loss
    is already averaged over the batch, so 1 keeps it on the scale the authors' code produces.
    """

    name = "kdsvd"
    paper = "Self-supervised Knowledge Distillation Using Singular Value Decomposition, ECCV 2018, arXiv 1807.06819"
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.check_pair(s_shapes, t_shapes, args)
        self.criterion = KDSVD()

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        check_kdsvd_shapes(s_shapes[1:-1], t_shapes[1:-1])

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return sum(self.criterion(out_s.feats[1:-1], out_t.feats[1:-1]))
