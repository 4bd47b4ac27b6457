"""FitNet: "FitNets: Hints for Thin Deep Nets", Romero, Ballas, Kahou, Chassang, Gatta and Bengio, ICLR 2015,
arXiv 1412.6550.

Loss: mean squared error between a regressor applied to a student feature map (the guided layer) and the
teacher's feature map at the same index (the hint).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from common.errors import PairError

from .base import Distiller, Shapes, register

__all__ = ["ConvReg", "HintLoss"]


class HintLoss(nn.Module):
    """Mean squared error over all elements (RepDistiller's ``HintLoss``)."""

    def __init__(self) -> None:
        super().__init__()
        self.crit = nn.MSELoss()

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return self.crit(f_s, f_t)


def _chw(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of a per-sample shape ``(C, H, W)`` or of a batch shape ``(N, C, H, W)``
    (RepDistiller passes the latter)."""
    if len(shape) not in (3, 4):
        raise PairError(f"ConvReg needs a feature map shape (C, H, W) or (N, C, H, W), got {tuple(shape)}")
    c, h, w = shape[-3:]
    return int(c), int(h), int(w)


def _regressor_conv(s_shape: Sequence[int], t_shape: Sequence[int]) -> nn.Module:
    """The convolution that maps the student's map onto the teacher's spatial size.

    RepDistiller's cases first (same layers, same parameter shapes): s_H = 2 t_H -> 3x3 stride-2 conv;
    2 s_H = t_H -> 4x4 stride-2 transposed conv; s_H >= t_H -> valid conv with kernel (1 + s_H - t_H,
    1 + s_W - t_W) (1x1 when sizes are equal). Added here: t_H = k s_H for any integer k > 2 -> transposed
    conv with stride k, padding k // 2 and kernel k + 2 (k // 2), which gives exactly k s_H and reduces to
    RepDistiller's 4/2/1 layer at k = 2. Other ratios raise :class:`PairError`.
    """
    s_c, s_h, s_w = _chw(s_shape)
    t_c, t_h, t_w = _chw(t_shape)
    if s_h == 2 * t_h:
        return nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    if s_h >= t_h:
        if s_w < t_w:
            raise PairError(
                f"ConvReg cannot map student map {(s_c, s_h, s_w)} to teacher map {(t_c, t_h, t_w)}: "
                "the student is taller but narrower"
            )
        return nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    k = t_h // s_h
    if t_h != k * s_h or t_w != k * s_w:
        raise PairError(
            f"ConvReg cannot map student map {(s_c, s_h, s_w)} to teacher map {(t_c, t_h, t_w)}: the "
            "teacher's size must be an integer multiple (same in H and W) of the student's when it is larger"
        )
    pad = k // 2
    return nn.ConvTranspose2d(s_c, t_c, kernel_size=k + 2 * pad, stride=k, padding=pad)


class ConvReg(nn.Module):
    """FitNet's regressor: a convolution to the teacher's channels and size, BatchNorm, optional ReLU.

    ``s_shape``/``t_shape`` are the student's and teacher's feature shapes, ``(N, C, H, W)`` as in
    RepDistiller or per-sample ``(C, H, W)``. Raises :class:`PairError` (a ``ValueError``) when the
    sizes cannot be matched (RepDistiller raises ``NotImplemented``, which is a ``TypeError``).

    ``use_relu=True`` is RepDistiller's default and is kept for compatibility, although the regressor
    then cannot produce the negative values that WRN's (pre-activation) stage outputs contain.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        self.use_relu = use_relu
        self.conv = _regressor_conv(s_shape, t_shape)
        self.bn = nn.BatchNorm2d(_chw(t_shape)[0])
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))  # (B, t_C, t_H, t_W)
        return self.relu(x) if self.use_relu else x


@register
class FitNetDistiller(Distiller):
    """Hint loss on ``feats[hint_layer]`` through a trainable :class:`ConvReg`.

    Single stage, as in RepDistiller: the hint loss is added to CE from the first epoch. The paper's
    recipe is two-stage (first train the student's lower part and the regressor on the hint alone, then
    the whole student with KD); that pre-training is not the default here.
    """

    name = "hint"
    paper = "FitNets: Hints for Thin Deep Nets (ICLR 2015, arXiv 1412.6550)"
    # run_cifar_distill.sh: --distill hint -a 0 -b 100
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 100.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.layer = args.hint_layer
        self.regressor = ConvReg(s_shapes[self.layer], t_shapes[self.layer])
        self.hint = HintLoss()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """RepDistiller's flag, same name and default."""
        parser.add_argument("--hint_layer", type=int, default=2, choices=[0, 1, 2, 3, 4], help="FitNet feature index")

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        h = args.hint_layer
        n = min(len(s_shapes), len(t_shapes))
        if not 0 <= h < n:
            raise PairError(
                f"--hint_layer {h} is out of range: the student has {len(s_shapes)} features and the "
                f"teacher {len(t_shapes)}; choose 0..{n - 1} pointing at a feature map"
            )
        for who, shapes in (("student", s_shapes), ("teacher", t_shapes)):
            if len(shapes[h]) != 3:
                raise PairError(
                    f"--hint_layer {h} points at the {who}'s feature of shape {tuple(shapes[h])}, not a "
                    f"(C, H, W) map (the pooled vector); choose a smaller --hint_layer"
                )
        try:
            _regressor_conv(s_shapes[h], t_shapes[h])
        except PairError as err:
            raise PairError(f"hint at --hint_layer {h}: {err}") from None

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        f_s = self.regressor(out_s.feats[self.layer])  # (B, t_C, t_H, t_W)
        return self.hint(f_s, out_t.feats[self.layer])
