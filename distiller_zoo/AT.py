"""AT: "Paying More Attention to Attention: Improving the Performance of Convolutional Neural Networks via
Attention Transfer", Zagoruyko and Komodakis, ICLR 2017, arXiv 1612.03928.

Loss: per stage, the mean squared difference between the student's and teacher's L2-normalised spatial
attention maps (channel mean of the feature map raised to the power p), summed over stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Distiller, Shapes, pool_to_smaller, register

__all__ = ["Attention"]


class Attention(nn.Module):
    """Attention transfer with ``p = 2`` (the paper's choice, section 3). ``forward(g_s, g_t)`` takes two
    lists of (B, C, H, W) maps and returns the list of per-pair losses (the shorter list wins)."""

    def __init__(self, p: int = 2) -> None:
        super().__init__()
        self.p = p

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.at_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def at_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        return (self.at(f_s) - self.at(f_t)).pow(2).mean()

    def at(self, f: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H*W), unit L2 norm per sample
        return F.normalize(f.pow(self.p).mean(1).flatten(1))


@register
class ATDistiller(Distiller):
    """Attention transfer on every stage map, ``feats[1:-1]``, zipped (the shorter list wins)."""

    name = "attention"
    paper = "Paying More Attention to Attention (ICLR 2017, arXiv 1612.03928)"
    # run_cifar_distill.sh: --distill attention -a 0 -b 1000
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1000.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.at = Attention(p=2)

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return sum(self.at(out_s.feats[1:-1], out_t.feats[1:-1]))
