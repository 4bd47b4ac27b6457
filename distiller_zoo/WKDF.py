"""WKD-F: "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge Distillation", Lv, Yang and Li,
NeurIPS 2024, arXiv 2412.08139 (the feature part).

Loss: each channel of the last feature map (per image, per cell of a spatial grid) as a 1-D Gaussian given by
its mean and standard deviation; the squared 2-Wasserstein distance between the student's (through a 1x1
projector) and the teacher's diagonal Gaussians, ``ratio * |mu_s - mu_t|^2 + |sigma_s - sigma_t|^2``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from common.errors import PairError

from .base import Distiller, Shapes, register
from .FitNet import ConvReg

__all__ = ["gaussian_moments", "wkdf_loss"]


def gaussian_moments(feat: torch.Tensor, grid: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``sqrt(var + eps)`` (unbiased variance) of every channel in each cell of a ``grid x grid`` split
    of ``feat`` (B, C, H, W), shapes (B, C, g, g) each. ``grid`` must divide H and W (WKD's
    ``adaptive_avg_std_pool2d`` cells are then these equal blocks; grid 1: the whole map)."""
    B, C, H, W = feat.shape
    cells = feat.float().view(B, C, grid, H // grid, grid, W // grid)  # (B, C, g, h, g, w)
    mean = cells.mean(dim=(3, 5))  # (B, C, g, g)
    std = torch.sqrt(cells.var(dim=(3, 5)) + eps)  # (B, C, g, g)
    return mean, std


def wkdf_loss(f_s: torch.Tensor, f_t: torch.Tensor, ratio: float, grid: int, eps: float) -> torch.Tensor:
    """``ratio * mean_loss + cov_loss``: each the squared differences summed over channels and cells, divided
    by ``grid^2 * B`` (WKD ``mdistiller/distillers/WKD.py``, ``wkd_feature_loss`` and ``forward_train``)."""
    mu_s, sd_s = gaussian_moments(f_s, grid, eps)
    mu_t, sd_t = gaussian_moments(f_t, grid, eps)
    n = grid**2 * f_s.shape[0]
    return (ratio * (mu_s - mu_t).pow(2).sum() + (sd_s - sd_t).pow(2).sum()) / n


def cosine_decay(epoch: int, start: float, total: float) -> float:
    """1 until ``start``, then ``(1 + cos(pi (epoch - start) / (total - start))) / 2`` (WKD ``forward_train``:
    the loss weight decays after ``COSINE_DECAY_EPOCH``; 0 disables)."""
    if start <= 0 or epoch <= start or total <= start:
        return 1.0
    return 0.5 * (1.0 + math.cos((epoch - start) / (total - start) * math.pi))


@register
class WKDFDistiller(Distiller):
    """WKD-F on the last feature map (WKD ``HINT_LAYER: -1``), the student's through mdistiller's ``ConvReg``
    (convolution + BN + ReLU, FitNet's regressor here; WKD ``PROJECTOR: "conv1x1"``).

    Defaults: WKD ``configs/cifar100/wkd_f/res32x4_res8x4.yaml``: ``-b 0.08``, ``--wkdf_ratio 4``,
    ``--wkdf_grid 1``, ``--wkdf_eps 1e-5``, the weight's cosine decay from epoch 150 to the last (``--epochs``),
    CE weight 1 (``mdistiller/engine/cfg.py``'s own defaults, ratio 2, grid 4 and a bottleneck projector, are its
    ImageNet settings). The other CIFAR config (wrn_40_2->ShuffleV1) is a row of
    ``helper/published/recipes.csv``.
    """

    name = "wkdf"
    paper = (
        "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge Distillation "
        "(NeurIPS 2024, arXiv 2412.08139)"
    )
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 0.08}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.projector = ConvReg(s_shapes[-2], t_shapes[-2], use_relu=True)
        self.ratio, self.grid, self.eps = args.wkdf_ratio, args.wkdf_grid, args.wkdf_eps
        self.decay_epoch, self.epochs = args.wkdf_decay_epoch, args.epochs if hasattr(args, "epochs") else 240
        self.decay = 1.0  # until the engine's first set_epoch

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        _, h, w = t_shapes[-2]
        if args.wkdf_grid < 1:
            raise PairError(f"wkdf: --wkdf_grid {args.wkdf_grid} must be at least 1")
        if h % args.wkdf_grid or w % args.wkdf_grid:
            raise PairError(f"wkdf: --wkdf_grid {args.wkdf_grid} does not divide the teacher's {h}x{w} map")
        ConvReg(s_shapes[-2], t_shapes[-2])  # raises PairError when the map sizes cannot be matched

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("WKD-F")
        group.add_argument("--wkdf_ratio", type=float, default=4.0, help="WKD-F: weight of the means (4)")
        group.add_argument("--wkdf_grid", type=int, default=1, help="WKD-F: spatial grid side (1)")
        group.add_argument("--wkdf_eps", type=float, default=1e-5, help="WKD-F: added to the variances (1e-5)")
        group.add_argument(
            "--wkdf_decay_epoch", type=float, default=150, help="WKD-F: cosine decay of the weight after it (150)"
        )

    def set_epoch(self, epoch: int, stage: str) -> None:
        self.decay = cosine_decay(epoch, self.decay_epoch, self.epochs)

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        f_s = self.projector(out_s.feats[-2])  # (B, C_t, H_t, W_t)
        return self.decay * wkdf_loss(f_s, out_t.feats[-2], self.ratio, self.grid, self.eps)
