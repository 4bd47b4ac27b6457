"""VID: "Variational Information Distillation for Knowledge Transfer", Ahn, Hu, Damianou, Lawrence and Dai,
CVPR 2019, arXiv 1904.05835.

Loss: per stage, the negative log-likelihood of the teacher's feature map under a Gaussian whose mean is
regressed from the student's map and whose variance is learned per teacher channel (a variational lower
bound on their mutual information), averaged over elements and summed over stages.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Distiller, Shapes, pool_to_smaller, register

__all__ = ["VIDLoss"]


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)


class VIDLoss(nn.Module):
    """One stage of VID (RepDistiller's ``VIDLoss``, from the authors' code).

    The mean is a three-layer 1x1-conv regressor (input -> mid -> mid -> target channels, ReLU between);
    the variance of channel c is ``softplus(log_scale_c) + eps``, initialised to ``init_pred_var``
    (5.0 and eps 1e-5 are the authors' defaults). The loss is
    ``mean(0.5 * ((mu - t)^2 / var + log var))``; it can be negative.
    """

    def __init__(
        self,
        num_input_channels: int,
        num_mid_channel: int,
        num_target_channels: int,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            _conv1x1(num_input_channels, num_mid_channel),
            nn.ReLU(),
            _conv1x1(num_mid_channel, num_mid_channel),
            nn.ReLU(),
            _conv1x1(num_mid_channel, num_target_channels),
        )
        # Inverse softplus, so that softplus(log_scale) + eps == init_pred_var at the start.
        inv_softplus = math.log(math.expm1(init_pred_var - eps))
        self.log_scale = nn.Parameter(torch.full((num_target_channels,), inv_softplus))
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        input, target = pool_to_smaller(input, target)
        pred_mean = self.regressor(input)  # (B, t_C, H, W)
        pred_var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)  # (1, t_C, 1, 1)
        neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
        return neg_log_prob.mean()


@register
class VIDDistiller(Distiller):
    """VID on every stage map, ``feats[1:-1]`` zipped, one ``VIDLoss(s_C, t_C, t_C)`` per pair, summed.
    The regressors and variances are trained with the student (and get its weight decay, as in
    RepDistiller)."""

    name = "vid"
    paper = "Variational Information Distillation for Knowledge Transfer (CVPR 2019, arXiv 1904.05835)"
    # run_cifar_distill.sh: --distill vid -a 0 -b 1
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.vid = nn.ModuleList(VIDLoss(s[0], t[0], t[0]) for s, t in zip(s_shapes[1:-1], t_shapes[1:-1]))

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        pairs = zip(out_s.feats[1:-1], out_t.feats[1:-1], self.vid)
        return sum(vid(f_s, f_t) for f_s, f_t, vid in pairs)
