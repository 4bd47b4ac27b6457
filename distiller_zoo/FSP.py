"""FSP: Yim, Joo, Bae and Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning", CVPR 2017 (no arXiv version).

Loss in words: the mean squared difference between the student's and the teacher's FSP ("flow of
solution procedure") matrices, the position-averaged inner products between the channels of two
consecutive feature maps.

Recipe (RepDistiller): the FSP loss trains the student body (``student.get_feat_modules()``) for
``--init_epochs`` epochs; the main stage is then plain CE (+ KD with ``-a``), so ``-b`` has no effect
(``has_loss = False``; the engine gives the method term weight 0). As in the paper, FSP serves as an
initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from common.errors import PairError

from .base import Distiller, Shapes, pool_to_smaller, register

__all__ = ["FSP", "FSPDistiller"]


def check_fsp_shapes(s_shapes: Shapes, t_shapes: Shapes) -> None:
    """Raise :class:`PairError` unless both lists have the same length and the same channel counts.

    Accepts per-sample ``(C, H, W)`` or RepDistiller's batched ``(N, C, H, W)`` shapes.
    """
    if len(s_shapes) != len(t_shapes):
        raise PairError(
            f"fsp needs as many feature maps in the student as in the teacher: student has "
            f"{len(s_shapes)} ({[tuple(s) for s in s_shapes]}), teacher {len(t_shapes)} "
            f"({[tuple(t) for t in t_shapes]})"
        )
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes)):
        if len(s) < 3 or len(t) < 3:
            raise PairError(f"fsp: feature {i} is not a map: student {tuple(s)}, teacher {tuple(t)}")
        if s[-3] != t[-3]:
            raise PairError(
                f"fsp needs equal channel counts at every feature map, but feature {i} has {s[-3]} "
                f"channels in the student ({tuple(s)}) and {t[-3]} in the teacher ({tuple(t)})"
            )


class FSP(nn.Module):
    """RepDistiller's ``FSP(s_shapes, t_shapes)``; ``forward(g_s, g_t)`` returns one loss per pair of
    consecutive maps.

    For maps ``bot = g[i]`` (B, C_b, H, W) and ``top = g[i+1]`` (B, C_t, H', W'), the larger is pooled to
    the smaller size and ``G[c_t, c_b] = mean over positions of top[c_t] * bot[c_b]`` (B, C_t, C_b); the
    loss for each pair is ``mean (G_s - G_t)^2``. Raises :class:`PairError` (a ``ValueError``, like
    RepDistiller's) when the channel counts differ.
    """

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes) -> None:
        super().__init__()
        check_fsp_shapes(s_shapes, t_shapes)

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        s_fsp = self.compute_fsp(g_s)
        t_fsp = self.compute_fsp(g_t)
        return [(s - t).pow(2).mean() for s, t in zip(s_fsp, t_fsp)]

    @staticmethod
    def compute_fsp(g: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        matrices = []
        for bot, top in zip(g[:-1], g[1:]):
            bot, top = pool_to_smaller(bot, top)
            bot = bot.flatten(2)  # (B, C_b, HW)
            top = top.flatten(2)  # (B, C_t, HW)
            matrices.append(torch.bmm(top, bot.transpose(1, 2)) / bot.shape[2])  # (B, C_t, C_b)
        return matrices


@register
class FSPDistiller(Distiller):
    """``--distill fsp``: FSP over ``feats[:-1]`` (stem and stage maps), init stage only."""

    name = "fsp"
    paper = (
        "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer Learning, CVPR 2017"
    )
    # beta 50: RepDistiller scripts/run_cifar_distill.sh, `--distill fsp -a 0 -b 50` (no effect there).
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 50.0}
    has_loss = False  # the main stage has no FSP term, exactly as RepDistiller (loss_kd = 0)
    init_stage = True

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.criterion = FSP(s_shapes[:-1], t_shapes[:-1])

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        check_fsp_shapes(s_shapes[:-1], t_shapes[:-1])

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        # RepDistiller's main stage: loss_kd = 0 (the engine does not call this while has_loss is False).
        return out_s.logits.new_zeros(())

    def init_modules(self, student: nn.Module) -> list[nn.Module]:
        return [student.get_feat_modules()]

    def init_loss(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return sum(self.criterion(out_s.feats[:-1], out_t.feats[:-1]))
