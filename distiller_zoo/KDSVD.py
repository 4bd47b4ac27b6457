"""KD-SVD: Lee, Kim and Song, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition", ECCV 2018, arXiv 1807.06819.

Loss in words: compress each stage map to its leading right-singular vectors (one per channel set),
align the student's to the teacher's, and match the RBF correlations between consecutive stages.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from common.errors import PairError

from .base import Distiller, Shapes, register

__all__ = ["KDSVD", "KDSVDDistiller"]


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class GuardedSVD(torch.autograd.Function):
    """Singular values and right-singular vectors of (B, m, n) matrices, with the gradient guarded as in the
    authors' TensorFlow code (sseung0703/KD_methods_with_TF, ``nets/SVP.py``, ``gradient_svd``).

    The gradient is the usual one (Townsend, "Differentiating the Singular Value Decomposition", 2016) for a
    loss of S and V: ``U [diag(gS) + S (F o (V^T gV - gV^T V))] V^T + U S^-1 gV^T (I - V V^T)`` with
    ``F[i, j] = 1 / (s_j^2 - s_i^2)``. Two equal singular values (two dead channels of a ReLU map give two
    zeros) make ``F`` infinite; ``torch.linalg.svd``'s own backward then returns NaN for the whole batch (0 x
    inf), and one such step makes the student's weights NaN. As the authors (``KT = removenan(KT)``), the
    entries of ``F`` that are not finite are 0: the gradient of a vector within a tied pair is left undefined
    rather than made NaN. Elsewhere the gradient equals torch's (tested). ``1 / (s + 1e-8)`` is theirs too.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)  # (B, m, r), (B, r), (B, r, n)
        v = vh.transpose(1, 2)  # (B, n, r)
        ctx.save_for_backward(u, s, v)
        return s, v

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_s: torch.Tensor | None, g_v: torch.Tensor | None) -> torch.Tensor:
        u, s, v = ctx.saved_tensors
        g_s = torch.zeros_like(s) if g_s is None else g_s
        g_v = torch.zeros_like(v) if g_v is None else g_v
        s2 = s * s
        f = finite_or_zero(1 / (s2.unsqueeze(1) - s2.unsqueeze(2)))  # (B, r, r), [i, j] = 1/(s_j^2 - s_i^2)
        vt_gv = v.transpose(1, 2) @ g_v  # (B, r, r)
        inner = torch.diag_embed(g_s) + s.unsqueeze(2) * (f * (vt_gv - vt_gv.transpose(1, 2)))
        g_x = u @ inner @ v.transpose(1, 2)  # (B, m, n)
        if v.shape[1] > v.shape[2]:  # n > r: V is not square, its complement gets a gradient too
            g_vt = g_v.transpose(1, 2)  # (B, r, n)
            g_x = g_x + (u / (s + 1e-8).unsqueeze(1)) @ (g_vt - (g_vt @ v) @ v.transpose(1, 2))
        return g_x


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

    ``guarded`` (default) takes the SVD's gradient from :class:`GuardedSVD`, as the authors' code; False is
    ``torch.linalg.svd``'s own gradient, as RepDistiller (``torch.svd``), NaN at tied singular values. The
    loss value is the same either way.
    """

    def __init__(self, k: int = 1, guarded: bool = True) -> None:
        super().__init__()
        self.k = k
        self.guarded = guarded

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        losses = []
        v_s_prev = v_t_prev = None
        for f_s, f_t in zip(g_s, g_t):
            s_t, v_t = self.svd(f_t, self.k, self.guarded)  # (B, k), (B, C, k)
            _, v_s = self.svd(f_s, self.k + 3, self.guarded)  # (B, C, k + 3)
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
    def svd(feat: torch.Tensor, n: int, guarded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``n`` singular values (L2-normalised) and right-singular vectors of a (B, C, H, W) map."""
        # LAPACK has no half-precision SVD: run it in fp32 under autocast too.
        x = feat.flatten(2).transpose(1, 2).float()  # (B, HW, C)
        if guarded:
            s, v = GuardedSVD.apply(x)  # s (B, r), v (B, C, r), r = min(HW, C)
        else:
            _, s, vh = torch.linalg.svd(x, full_matrices=False)
            v = vh.transpose(1, 2)
        v = finite_or_zero(v)
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
        self.criterion = KDSVD(guarded=args.kdsvd_grad == "guarded")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument_group("KD-SVD").add_argument(
            "--kdsvd_grad", type=str, default="guarded", choices=["guarded", "torch"],
            help="KD-SVD: the SVD's gradient with tied singular values zeroed as the authors' code (guarded), or "
            "torch's own as RepDistiller (NaN at ties: a fresh student diverges at -b 1 within ~50 steps)",
        )  # fmt: skip

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        check_kdsvd_shapes(s_shapes[1:-1], t_shapes[1:-1])

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return sum(self.criterion(out_s.feats[1:-1], out_t.feats[1:-1]))
