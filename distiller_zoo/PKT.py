"""PKT: "Learning Deep Representations with Probabilistic Knowledge Transfer", Passalis and Tefas, ECCV 2018,
arXiv 1803.10837.

Loss: KL divergence between the teacher's and student's conditional probability distributions over the
batch, built from cosine similarities of their feature vectors mapped to [0, 1] and row-normalised.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Distiller, Shapes, register

__all__ = ["PKT"]


class PKT(nn.Module):
    """RepDistiller's ``PKT`` (from the authors' code): ``forward(f_s, f_t)`` on (B, D) features."""

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return self.cosine_similarity_loss(f_s, f_t)

    @staticmethod
    def _conditional(x: torch.Tensor, eps: float) -> torch.Tensor:
        """(B, D) -> (B, B): row i is the distribution of sample i's (cosine + 1) / 2 over the batch."""
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)  # the authors zero NaNs
        sim = (x @ x.t() + 1.0) / 2.0
        return sim / sim.sum(1, keepdim=True)

    @staticmethod
    def cosine_similarity_loss(output_net: torch.Tensor, target_net: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
        """Mean over the B^2 entries of ``P_t * log((P_t + eps) / (P_s + eps))`` (eps 1e-7 as the authors)."""
        with torch.autocast(device_type=output_net.device.type, enabled=False):
            p_s = PKT._conditional(output_net.float().flatten(1), eps)
            p_t = PKT._conditional(target_net.float().flatten(1), eps)
            return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register
class PKTDistiller(Distiller):
    """PKT on the pooled vectors, ``feats[-1]``."""

    name = "pkt"
    paper = "Learning Deep Representations with Probabilistic Knowledge Transfer (ECCV 2018, arXiv 1803.10837)"
    # run_cifar_distill.sh: --distill pkt -a 0 -b 30000
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 30000.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.pkt = PKT()

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return self.pkt(out_s.feats[-1], out_t.feats[-1])
