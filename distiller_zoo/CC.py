"""CC: "Correlation Congruence for Knowledge Distillation", Peng, Jin, Liu, Li, Wu, Liu, Zhou and Zhang,
ICCV 2019, arXiv 1904.01802.

Loss (RepDistiller's version, code from the CC authors): with delta_i = |e_s,i - e_t,i| the element-wise
gap between the student's and teacher's embeddings of sample i, the mean over consecutive samples of
<delta_i, delta_i+1>.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .base import Distiller, Shapes, register

__all__ = ["Correlation", "LinearEmbed"]


class Correlation(nn.Module):
    """``mean_i sum_d |e_s - e_t|_{i,d} * |e_s - e_t|_{i+1,d}`` over i = 0..B-2 (inputs (B, D))."""

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        delta = (f_s - f_t).abs()  # (B, D)
        return (delta[:-1] * delta[1:]).sum(1).mean()


class LinearEmbed(nn.Module):
    """Flatten, then a linear map to ``dim_out`` (RepDistiller's ``models.util.LinearEmbed``)."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # (B, dim_out)


@register
class CCDistiller(Distiller):
    """Correlation congruence between trainable linear embeddings (size ``--feat_dim``) of the student's
    and the teacher's pooled vectors, ``feats[-1]``; both embeddings are trained, as in RepDistiller."""

    name = "correlation"
    paper = "Correlation Congruence for Knowledge Distillation (ICCV 2019, arXiv 1904.01802)"
    # run_cifar_distill.sh: --distill correlation -a 0 -b 0.02
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 0.02}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.embed_s = LinearEmbed(math.prod(s_shapes[-1]), args.feat_dim)
        self.embed_t = LinearEmbed(math.prod(t_shapes[-1]), args.feat_dim)
        self.cc = Correlation()

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return self.cc(self.embed_s(out_s.feats[-1]), self.embed_t(out_t.feats[-1]))
