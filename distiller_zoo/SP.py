"""SP: "Similarity-Preserving Knowledge Distillation", Tung and Mori, ICCV 2019, arXiv 1907.09682.

Loss: squared Frobenius distance between the student's and teacher's row-normalised batch similarity
(Gram) matrices, divided by B^2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Distiller, Shapes, register

__all__ = ["Similarity"]


class Similarity(nn.Module):
    """RepDistiller's ``Similarity``: ``forward(g_s, g_t)`` takes lists of features and returns the list
    of per-pair losses (paper eq. 4)."""

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    @staticmethod
    def similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        bsz = f_s.shape[0]
        # float32 outside autocast: the Gram matrix sums C*H*W products per entry.
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            f_s = f_s.float().flatten(1)  # (B, C*H*W)
            f_t = f_t.float().flatten(1)
            g_s = F.normalize(f_s @ f_s.t())  # (B, B), each row unit L2 norm
            g_t = F.normalize(f_t @ f_t.t())
            return (g_t - g_s).pow(2).sum() / (bsz * bsz)


@register
class SPDistiller(Distiller):
    """Similarity preservation on the last feature map, ``feats[-2]``."""

    name = "similarity"
    paper = "Similarity-Preserving Knowledge Distillation (ICCV 2019, arXiv 1907.09682)"
    # run_cifar_distill.sh: --distill similarity -a 0 -b 3000
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 3000.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.sp = Similarity()

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return sum(self.sp([out_s.feats[-2]], [out_t.feats[-2]]))
