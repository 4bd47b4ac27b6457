"""OFD: "A Comprehensive Overhaul of Feature Distillation", Heo, Kim, Yun, Park, Kwak and Choi, ICCV 2019,
arXiv 1904.01866.

Loss: at every stage, a partial L2 distance between the student's pre-ReLU feature map (through a 1x1 conv +
BN connector) and the teacher's pre-ReLU map clipped from below at a per-channel margin (the expected value of
the teacher's negative responses, from its BN statistics); positions where the student is already at or below
a non-positive target are not penalised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PairError

from .base import Distiller, Shapes, register

__all__ = ["ofd_connector", "ofd_margin", "partial_l2"]

# Below this probability of a negative response (Phi(-m/s)), the conditional mean is numerically unreliable
# and the margin is taken as -3 s instead (official OFD and mdistiller ``OFD.init_ofd_modules``: 0.001, -3 s).
MIN_NEGATIVE_MASS = 1e-3


def ofd_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel margin E[x | x < 0] for x ~ N(beta, gamma^2), the BN's output distribution; shape (C,).

    ``m - s * phi(m/s) / Phi(-m/s)`` with ``s = |gamma|``, ``m = beta`` (the mean of a normal truncated above
    at 0), or ``-3 s`` when ``Phi(-m/s) <= 0.001``.
    """
    s = bn.weight.detach().double().abs()  # (C,)
    m = bn.bias.detach().double()  # (C,)
    mass = torch.special.ndtr(-m / s)  # P(x < 0)
    density = torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(mass > MIN_NEGATIVE_MASS, m - s * density / mass, -3 * s)
    return margin.float()


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's distance: sum over C, H, W of the partial L2, averaged over the batch.

    The target is ``max(teacher, margin)`` (the teacher transform of the paper, eq. 3); the squared error is
    skipped where ``source <= target <= 0`` (eq. 6), i.e. where the student is already inactive enough.
    ``source``, ``target`` (B, C, H, W); ``margin`` (C,).
    """
    # float32: under bf16 autocast a sum of squares over the whole map loses the small terms.
    source, target = source.float(), target.float()
    margin = margin.view(1, -1, 1, 1).to(source)
    clipped = torch.maximum(target, margin)
    skip = (source <= clipped) & (clipped <= 0)
    return ((source - clipped) ** 2).masked_fill(skip, 0.0).sum() / source.shape[0]


def ofd_connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN from the student's to the teacher's channels, initialised as the official code
    (conv weights N(0, sqrt(2 / (k * k * out_channels))), BN weight 1, bias 0)."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels))


def _stage_maps(shapes: Shapes) -> list[Sequence[int]]:
    return [s for s in shapes[1:-1] if len(s) == 3]


@register
class OFDDistiller(Distiller):
    """OFD on the pre-ReLU stage maps (``feats[1:-1]`` with ``preact=True``), deepest stages aligned.

    When the networks have different numbers of stages, the last ``n = min(n_s, n_t)`` of each are paired (as
    mdistiller's ``_align_list``), and so are the teacher's BNs (mdistiller indexes its margins from the first
    BN, which differs from this only when the counts differ). Teacher maps are average-pooled to the student's
    size. Stage ``i`` of ``n`` is weighted ``1 / 2^(n - i - 1)``, the deepest by 1.

    The margins need the teacher's BNs (``get_bn_before_relu``): the engine calls :meth:`bind_teacher` after
    construction; before that the margins are unset and ``forward`` raises.

    Default weights (mdistiller ``cfg.py``, ``CFG.OFD``: ``FEAT_WEIGHT 0.001``, ``CE_WEIGHT 1``; the official
    CIFAR code divides the summed distance by 1000 too): ``-r 1 -a 0 -b 0.001``.
    """

    name = "ofd"
    paper = "A Comprehensive Overhaul of Feature Distillation (ICCV 2019, arXiv 1904.01866)"
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1e-3}
    preact = True

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        s_maps, t_maps = _stage_maps(s_shapes), _stage_maps(t_shapes)
        self.n = min(len(s_maps), len(t_maps))
        self.t_stages = len(t_maps)
        pairs = list(zip(s_maps[-self.n :], t_maps[-self.n :]))
        self.connectors = nn.ModuleList([ofd_connector(int(s[0]), int(t[0])) for s, t in pairs])
        for i, (_, t) in enumerate(pairs):
            # Persistent, so a checkpoint carries them; NaN marks "not bound yet".
            self.register_buffer(f"margin{i}", torch.full((int(t[0]),), float("nan")))
        self.bound = False
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "bound", True))

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        for who, shapes in (("student", s_shapes), ("teacher", t_shapes)):
            if not _stage_maps(shapes):
                raise PairError(f"ofd: the {who} has no (C, H, W) stage map among its features {shapes}")

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Compute the margins from the teacher's ``get_bn_before_relu()`` (one BN per stage map).

        A BN narrower than its stage map covers the map's trailing channels (ShuffleV2's right branch,
        unshuffled ``preact``); the other channels are ReLU outputs of earlier units, never negative, for
        which margin 0 gives the same loss as any negative margin.
        """
        bns = list(teacher.get_bn_before_relu())
        if len(bns) != self.t_stages:
            raise PairError(
                f"ofd: the teacher has {self.t_stages} stage maps but get_bn_before_relu() gives {len(bns)} BNs"
            )
        for i, bn in enumerate(bns[-self.n :]):
            buf = getattr(self, f"margin{i}")
            margin = ofd_margin(bn)
            if margin.numel() < buf.numel():
                if getattr(teacher, "shuffle_preact", False):
                    raise PairError("ofd: a ShuffleV2 teacher with shuffle_preact=True has no per-channel margin")
                margin = torch.cat([margin.new_zeros(buf.numel() - margin.numel()), margin])
            if margin.numel() != buf.numel():
                raise PairError(f"ofd: teacher BN {i} has {margin.numel()} channels, its map {buf.numel()}")
            buf.copy_(margin)
        self.bound = True

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        if not self.bound:
            raise RuntimeError("ofd: call bind_teacher(teacher) after construction (the margins come from its BNs)")
        s_maps = [f for f in out_s.feats[1:-1] if f.dim() == 4][-self.n :]
        t_maps = [f for f in out_t.feats[1:-1] if f.dim() == 4][-self.n :]
        loss = out_s.logits.new_zeros(())
        for i, (connector, f_s, f_t) in enumerate(zip(self.connectors, s_maps, t_maps)):
            source = connector(f_s)  # (B, t_C, s_H, s_W)
            target = F.adaptive_avg_pool2d(f_t, source.shape[-2:])  # (B, t_C, s_H, s_W)
            loss = loss + partial_l2(source, target, getattr(self, f"margin{i}")) / 2 ** (self.n - i - 1)
        return loss
