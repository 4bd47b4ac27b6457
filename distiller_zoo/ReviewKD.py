"""ReviewKD: "Distilling Knowledge via Knowledge Review", Chen, Liu, Zhao and Jia, CVPR 2021, arXiv 2104.09044.

Loss: the student's stage features, fused from the deepest stage down by attention-based fusion (ABF: each
level mixes its own projected features with the upsampled fused result of the level below, with two
per-pixel attention maps), are matched to the teacher's features of the same level by the hierarchical
context loss (HCL: MSE at full resolution plus at 4x4, 2x2 and 1x1 average-pooled resolutions, halving the
weight each time), summed over levels and ramped up linearly over 20 epochs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PairError

from .base import Distiller, Shapes, adaptive_avg_pool2d, register
from .DKD import linear_warmup

__all__ = ["ABF", "hcl_loss"]

# The widest fusion channel count (official CIFAR-100/model/reviewkd.py and mdistiller: min(512, C_last)).
MAX_MID_CHANNELS = 512
# HCL's pyramid (official ``hcl``: ``for l in [4, 2, 1]``, each level at half the previous weight).
HCL_LEVELS = (4, 2, 1)


def hcl_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """HCL for one level: ``(MSE + sum_k w_k MSE(pool_k)) / (1 + sum_k w_k)``, ``w = 1/2, 1/4, 1/8`` for the
    pyramid sizes 4, 2, 1 smaller than the map (official ``hcl``). ``f_s``, ``f_t`` (B, C, H, W)."""
    h = f_s.shape[2]
    loss, weight, total = F.mse_loss(f_s, f_t), 1.0, 1.0
    for size in HCL_LEVELS:
        if size >= h:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(adaptive_avg_pool2d(f_s, size), adaptive_avg_pool2d(f_t, size))
        total += weight
    return loss / total


class ABF(nn.Module):
    """Attention-based fusion of one level (official ``ABF``).

    ``conv1`` (1x1 + BN) projects the student's feature to ``mid`` channels; when ``fuse``, the residual from
    the deeper level is resized to this level and the two are mixed per pixel with weights from a 1x1 conv +
    sigmoid on their concatenation. The mix is resized to the teacher's size and ``conv2`` (3x3 + BN) maps it
    to the teacher's channels. Returns ``(output for the loss, residual for the next level)``.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        # Official init: kaiming_uniform_(a=1) on both convs' weights.
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)  # (B, mid, h, w)
        if self.att_conv is not None:
            assert residual is not None
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")  # (B, mid, h, w)
            att = self.att_conv(torch.cat([x, residual], dim=1))  # (B, 2, h, w)
            x = x * att[:, :1] + residual * att[:, 1:]
        if tuple(x.shape[-2:]) != out_size:
            x = F.interpolate(x, out_size, mode="nearest")  # (B, mid, t_h, t_w)
        return self.conv2(x), x


def _levels(shapes: Shapes) -> list[tuple[int, int, int]]:
    """The review levels of a network: its stage maps ``feats[1:-1]``, then the pooled vector as a 1x1 map."""
    maps = [tuple(int(d) for d in s) for s in shapes[1:-1] if len(s) == 3]
    return [*maps, (int(shapes[-1][0]), 1, 1)]


def _as_levels(feats: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
    maps = [f for f in feats[1:-1] if f.dim() == 4]
    return [*maps, feats[-1][:, :, None, None]][-n:]  # pooled (B, D) -> (B, D, 1, 1)


@register
class ReviewKDDistiller(Distiller):
    """ReviewKD with the student's and teacher's levels paired from the deepest (pooled vector) upwards.

    Levels are each network's stage maps and its pooled vector (a 1x1 map): the official CIFAR code's
    per-architecture tables (``build_review_kd``: ``in_channels``, ``shapes``, ``out_shapes``) are exactly these
    shapes, so they are derived here from the feature shapes for any pair; when the counts differ the last
    ``min(n_s, n_t)`` levels are paired. The teacher's maps are pre-ReLU (``preact=True``, official
    ``teacher(images, is_feat=True, preact=True)``); the student's are post-ReLU in the official code and
    mdistiller (``REVIEWKD.STU_PREACT False``): the attribute ``student_preact`` tells the engine to ask the
    student for them (``--reviewkd_stu_preact`` switches to pre-ReLU student maps).

    Defaults: ``-b 5`` (mdistiller ``configs/cifar100/reviewkd.yaml``, ``REVIEWKD_WEIGHT 5.0``; the official
    ``script/reviewKD.sh`` uses 5 for most pairs and its own weight for three of them: the ``reviewkd`` rows of
    ``helper/published/recipes.csv``), CE weight 1, ``--reviewkd_warmup 20`` epochs (mdistiller
    ``WARMUP_EPOCHS 20``, official ``--kd-warm-up 20``). The official CIFAR trainer uses batch 128, lr 0.1
    (0.02 for MobileNetV2/ShuffleNets) and Nesterov momentum; mdistiller reruns ReviewKD with RepDistiller's
    schedule, which is this benchmark's.
    """

    name = "reviewkd"
    paper = "Distilling Knowledge via Knowledge Review (CVPR 2021, arXiv 2104.09044)"
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 5.0}
    preact = True

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        s_levels, t_levels = _levels(s_shapes), _levels(t_shapes)
        self.n = min(len(s_levels), len(t_levels))
        s_levels, t_levels = s_levels[-self.n :], t_levels[-self.n :]
        mid = min(MAX_MID_CHANNELS, s_levels[-1][0])
        # Built from the deepest level (no fusion input) to the shallowest, the order they run in.
        self.abfs = nn.ModuleList(
            [ABF(s[0], mid, t[0], fuse=k > 0) for k, (s, t) in enumerate(zip(s_levels[::-1], t_levels[::-1]))]
        )
        self.out_sizes = [(t[1], t[2]) for t in t_levels[::-1]]
        self.student_preact = bool(args.reviewkd_stu_preact)
        self.warmup_epochs = args.reviewkd_warmup
        self.warmup = 1.0  # until the engine's first set_epoch

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        for who, shapes in (("student", s_shapes), ("teacher", t_shapes)):
            if len(shapes[-1]) != 1:
                raise PairError(f"reviewkd: the {who}'s last feature {tuple(shapes[-1])} is not a pooled vector")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ReviewKD")
        group.add_argument("--reviewkd_warmup", type=float, default=20, help="ReviewKD: linear warm-up epochs (20)")
        group.add_argument(
            "--reviewkd_stu_preact", action="store_true", help="ReviewKD: pre-ReLU student maps (mdistiller option)"
        )

    def set_epoch(self, epoch: int, stage: str) -> None:
        self.warmup = linear_warmup(epoch, self.warmup_epochs)

    def fused(self, feats_s: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF outputs, shallowest level first (the teacher's level order)."""
        outputs, residual = [], None
        for abf, x, size in zip(self.abfs, _as_levels(feats_s, self.n)[::-1], self.out_sizes):
            out, residual = abf(x, residual, size)
            outputs.append(out)
        return outputs[::-1]

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        pairs = zip(self.fused(out_s.feats), _as_levels(out_t.feats, self.n))
        return self.warmup * sum(hcl_loss(f_s, f_t) for f_s, f_t in pairs)
