"""Pieces shared by the model families.

* :class:`FeatureOutput`, what every model returns for ``is_feat=True``;
* :class:`PreactBlock` and :func:`run_stage`, how a model taps the tensor before a stage's final ReLU
  (RepDistiller's ``preact=True`` features) without computing anything twice;
* :func:`check_start`, the argument check of every model's ``forward_from`` (the rest of the network from a
  feature), and :func:`run_stages_from`, the stage loop of those built from :class:`PreactBlock` stages;
* :func:`channel_shuffle` (both ShuffleNets) and :func:`he_normal_init_` (ResNets, WRN, VGG, MobileNetV2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn


class FeatureOutput(NamedTuple):
    """The result of ``model(x, is_feat=True)``.

    It unpacks like RepDistiller's pair, ``feats, logits = model(x, is_feat=True)``, so code written for
    RepDistiller runs unchanged; new code may read ``out.feats`` and ``out.logits``.

    ``feats``: the stem output, one map per stage, and last the pooled penultimate vector ``(B, D)``.
    ``logits``: ``(B, num_classes)``.
    """

    feats: list[Tensor]
    logits: Tensor


class PreactBlock(nn.Module):
    """A block that ends in an activation whose input is a feature of interest.

    Subclasses implement :meth:`pre_activation` (and :meth:`activate` when the ending is more than a ReLU).
    ``block(x)`` returns the activated output, ``block(x, preact=True)`` the tensor before the activation; a
    model taps the pre-activation with the second call and finishes the block with :meth:`activate`, so
    nothing runs twice and forward hooks on the block still fire.
    """

    def pre_activation(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def activate(self, pre: Tensor) -> Tensor:
        # Not in place: the caller may keep ``pre`` as a feature.
        return F.relu(pre)

    def forward(self, x: Tensor, preact: bool = False) -> Tensor:
        pre = self.pre_activation(x)
        return pre if preact else self.activate(pre)


def run_stage(stage: nn.Sequential, x: Tensor, preact: bool) -> tuple[Tensor, Tensor]:
    """Run a stage whose last block is a :class:`PreactBlock`.

    Returns ``(output, feature)``: the feature is the output itself, or with ``preact`` the last block's
    pre-activation (what RepDistiller's ``is_last`` blocks return as their second value).
    """
    if not preact:
        out = stage(x)
        return out, out
    *body, last = stage
    for block in body:
        x = block(x)
    pre = last(x, preact=True)
    return last.activate(pre), pre


def check_start(start: int, n_stages: int) -> None:
    """``forward_from``'s ``start``: a feature index, 0 (the stem) to ``n_stages`` (the last stage)."""
    if not 0 <= start <= n_stages:
        raise ValueError(f"forward_from: start must be a feature index in 0..{n_stages}, got {start}")


def run_stages_from(
    stages: tuple[nn.Sequential, ...], x: Tensor, start: int, preact: bool
) -> tuple[Tensor, list[Tensor]]:
    """``forward_from``'s stages: ``stages[start:]`` run on feature ``start`` ``x`` (checked with
    :func:`check_start`). Returns the last stage's output and each stage's feature (as :func:`run_stage`)."""
    check_start(start, len(stages))
    feats = []
    for stage in stages[start:]:
        x, feat = run_stage(stage, x, preact)
        feats.append(feat)
    return x, feats


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle (Zhang et al., CVPR 2018, arXiv 1707.01083, section 3.1).

    Channel ``g * (C // groups) + i`` moves to ``i * groups + g``: the channels coming from one group are
    spread over all groups of the next grouped convolution.
    """
    b, c, h, w = x.shape  # (B, C, H, W)
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def he_normal_init_(model: nn.Module) -> None:
    """Conv weights ~ N(0, 2 / fan_out), conv biases 0, BatchNorm weight 1 and bias 0.

    fan_out = k_h * k_w * out_channels (He et al., ICCV 2015, arXiv 1502.01852, "fan_out" mode). This is
    the rule of RepDistiller's ResNets (``kaiming_normal_``) and also of its WRN, VGG and MobileNetV2, which
    draw the same ``normal(0, sqrt(2 / n))`` with ``n = k * k * out_channels`` by hand. Linear layers differ
    per family and are left to the caller.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
