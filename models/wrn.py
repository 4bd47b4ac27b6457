"""Wide Residual Networks WRN-d-k: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016, arXiv 1605.07146: pre-activation blocks
(BN-ReLU-conv3x3-BN-ReLU-conv3x3), three groups of n = (d - 4) / 6 blocks of widths 16k, 32k, 64k at 32, 16
and 8 pixels, a final BN-ReLU, global average pooling and one Linear layer. Module names follow
RepDistiller's ``models/wrn.py`` (``block1.layer.0.convShortcut``, ...) so its checkpoints load with
``strict=True``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureOutput, check_start, he_normal_init_


class BasicBlock(nn.Module):
    """Pre-activation block: ``x + conv(relu(bn(conv(relu(bn1(x))))))``.

    Where the width or resolution changes the shortcut is a 1x1 conv of ``relu(bn1(x))`` instead of ``x``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut = None
        if in_planes != out_planes or stride != 1:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor, normed: Tensor | None = None) -> Tensor:
        """``normed``: ``self.bn1(x)`` when the caller has already computed it (to keep it as a feature)."""
        if normed is None:
            normed = self.bn1(x)
        act = F.relu(normed)  # not in place: ``normed`` may be a feature
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out  # (B, out_planes, H / stride, W / stride)


class NetworkBlock(nn.Module):
    """One group of ``nb_layers`` blocks; the first changes the width and resolution."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *(
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            )
        )

    def forward(self, x: Tensor, normed: Tensor | None = None) -> Tensor:
        """``normed``: the first block's ``bn1(x)``, when the caller has already computed it."""
        first, *rest = self.layer
        x = first(x, normed)
        for block in rest:
            x = block(x)
        return x


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs.

    ``forward(x, is_feat=True)`` features, per sample, with k the widen factor: conv1 output (16, 32, 32),
    group outputs (16k, 32, 32), (32k, 16, 16), (64k, 8, 8), pooled (64k,). Because the blocks are
    pre-activation, the group outputs are raw residual streams: not passed through a ReLU, and negative
    values are normal.

    ``preact=True`` replaces each group output ``f`` by the BN that reads it next: the next group's first
    ``bn1(f)``, and for the last group the final ``bn1(f)`` (the tensors whose ReLU follows). RepDistiller
    computes these by calling those BNs a second time after the forward (``models/wrn.py``, HobbitLong/
    RepDistiller @ b84f547), so in training mode their running statistics are updated twice per step (with
    the same batch statistics: ``r <- 0.9^2 r + 0.19 batch``), which changes the student's test-time
    statistics. That is the default here (``preact_bn_twice = True``, ``--wrn_preact_bn twice``); with
    ``preact_bn_twice = False`` (``--wrn_preact_bn once``) each BN output is computed once, tapped, and
    handed to the block that needs it: the same feature values, a single update. Outside training mode, or
    without ``preact``, both are the same.
    """

    preact_bn_twice: bool = True

    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WRN has depth 6n + 4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        self.pre_pool = nn.Identity()  # the map the classifier's pooling reads (SDD hooks it); no state
        he_normal_init_(self)
        nn.init.zeros_(self.fc.bias)  # RepDistiller zeroes the bias and keeps PyTorch's default weight

    def get_feat_modules(self) -> nn.ModuleList:
        """conv1 and the three groups, as RepDistiller (the final ``bn1`` is not included)."""
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BN applied next to each group's output: ``block2.layer[0].bn1``, ``block3.layer[0].bn1`` and
        the final ``bn1``. Their outputs are exactly the ``preact`` features."""
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | FeatureOutput:
        x = self.conv1(x)  # (B, 16, 32, 32)
        feats = [x]
        normed = None  # the BN output that opens the next group, computed here so it can be tapped
        for group, bn in zip((self.block1, self.block2, self.block3), self.get_bn_before_relu()):
            x = group(x, normed)  # (B, 16k, 32, 32), (B, 32k, 16, 16), (B, 64k, 8, 8)
            normed = bn(x)
            if preact and self.training and self.preact_bn_twice:
                feats.append(bn(x))  # RepDistiller's second call: equal values, a second running-stat update
            else:
                feats.append(normed if preact else x)
        x = F.avg_pool2d(self.pre_pool(F.relu(normed)), 8).flatten(1)  # (B, 64k)
        feats.append(x)
        logits = self.fc(x)
        return FeatureOutput(feats, logits) if is_feat else logits

    def forward_from(
        self, x: Tensor, start: int, is_feat: bool = False, preact: bool = False
    ) -> Tensor | FeatureOutput:
        """The rest of the network from feature ``start`` (0: conv1's output, 1-3: a group's output, the raw
        residual stream ``forward(., is_feat=True).feats[start]``): logits, or with ``is_feat`` the later groups'
        outputs, the pooled vector and the logits. With ``preact`` the outputs are the BNs that read them, each
        computed once (``--wrn_preact_bn once``). Parameter-free; skips ``pre_pool``."""
        groups = (self.block1, self.block2, self.block3)
        check_start(start, len(groups))
        feats, bns = [], self.get_bn_before_relu()
        normed = self.bn1(x) if start == len(groups) else None  # the BN that opens the next group
        for group, bn in zip(groups[start:], bns[start:]):
            x = group(x, normed)
            normed = bn(x)
            feats.append(normed if preact else x)
        x = F.avg_pool2d(F.relu(normed), 8).flatten(1)  # (B, 64k)
        feats.append(x)
        logits = self.fc(x)
        return FeatureOutput(feats, logits) if is_feat else logits

    def head(self, x: Tensor, preact: bool = False) -> Tensor:
        """The map the classifier pools, ``relu(bn1(x))``, from the last group's output ``x``; ``bn1(x)`` with
        ``preact`` (the official FCFD's last stage output, ``wrn.py`` ``stage_forward(3, .)``)."""
        normed = self.bn1(x)
        return normed if preact else F.relu(normed)


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, num_classes, widen_factor=1)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, num_classes, widen_factor=2)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, num_classes, widen_factor=1)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, num_classes, widen_factor=2)
