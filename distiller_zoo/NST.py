"""NST: Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
arXiv 1707.01219 (2017).

Loss in words: per stage, the squared maximum mean discrepancy, under a degree-2 polynomial kernel,
between the student's and the teacher's sets of L2-normalised per-channel activation maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PairError

from .base import Distiller, Shapes, pool_to_smaller, register

__all__ = ["NSTLoss", "NST"]


class NSTLoss(nn.Module):
    """RepDistiller's ``NSTLoss()``: ``forward(g_s, g_t)`` returns one loss per zipped stage pair.

    Per stage, with channel maps flattened to ``(B, C, HW)`` and L2-normalised over positions,
    ``k(a, b) = (a . b)^2`` over all channel pairs and
    ``L = mean k(t, t) + mean k(s, s) - 2 mean k(s, t)``: the full squared MMD (RepDistiller hard-codes
    ``full_loss = True``; the teacher-only term is a constant that keeps the loss 0 at a perfect match).
    """

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.nst_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def nst_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        s = F.normalize(f_s.flatten(2), dim=2)  # (B, C_s, HW)
        t = F.normalize(f_t.flatten(2), dim=2)  # (B, C_t, HW)
        return (
            self.poly_kernel(t, t).mean().detach() + self.poly_kernel(s, s).mean() - 2 * self.poly_kernel(s, t).mean()
        )

    @staticmethod
    def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(a_i . b_j)^2`` for every channel pair: (B, C_a, HW), (B, C_b, HW) -> (B, C_b, C_a).

        Degree 2, no offset: the paper's polynomial kernel, its best on CIFAR (Huang and Wang, Table 1).
        """
        return torch.bmm(b, a.transpose(1, 2)).pow(2)


@register
class NST(Distiller):
    """``--distill nst``: NSTLoss summed over the stage maps ``feats[1:-1]`` (zipped: the shorter list
    wins, as in RepDistiller). No adapters; any pair works since the kernel compares channels across nets."""

    name = "nst"
    paper = "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, arXiv 1707.01219 (2017)"
    # beta 50: RepDistiller scripts/run_cifar_distill.sh, `--distill nst -a 0 -b 50`.
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 50.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.check_pair(s_shapes, t_shapes, args)
        self.criterion = NSTLoss()

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        for i, (s, t) in enumerate(zip(s_shapes[1:-1], t_shapes[1:-1]), start=1):
            if len(s) != 3 or len(t) != 3:
                raise PairError(
                    f"nst: feature {i} must be a (C, H, W) map in both nets; student {tuple(s)}, teacher {tuple(t)}"
                )

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return sum(self.criterion(out_s.feats[1:-1], out_t.feats[1:-1]))
