"""CIFAR ResNets: resnet8/14/20/32/44/56/110 and the 4x wider resnet8x4/resnet32x4.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv 1512.03385, section 4.2: a
3x3 stem and three stages of n BasicBlocks (depth = 6n + 2) at 32x32, 16x16 and 8x8, then global average
pooling and one Linear layer. Widths [16, 16, 32, 64] as in the paper; the x4 variants use
[32, 64, 128, 256] (RepDistiller's choice). Module names follow RepDistiller's ``models/resnet.py`` so its
checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureOutput, PreactBlock, he_normal_init_, run_stage, run_stages_from


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(PreactBlock):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut; the ReLU comes after the sum."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # 1x1 conv + BN where the width or resolution changes, identity elsewhere: "option B" of the paper
        # (its own CIFAR nets used option A, zero-padded identity; RepDistiller uses B).
        self.downsample = downsample

    def pre_activation(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut  # (B, planes, H / stride, W / stride)


def make_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks; the first one changes the width and resolution."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes),
        )
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """A CIFAR ResNet of ``depth = 6n + 2`` layers with stem width ``num_filters[0]`` and stage widths
    ``num_filters[1:]``.

    ``forward(x, is_feat=True)`` features, per sample for resnet20 (resnet8x4 in brackets):
    stem (16, 32, 32) [(32, 32, 32)], stage outputs (16, 32, 32), (32, 16, 16), (64, 8, 8)
    [(64, 32, 32), (128, 16, 16), (256, 8, 8)], pooled (64,) [(256,)]. With ``preact=True`` the stage
    outputs are replaced by the last block's residual sum before its ReLU (stem and pooled unchanged).
    """

    def __init__(self, depth: int, num_filters: list[int], *, num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of BasicBlocks has depth 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(3, num_filters[0])
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_stage(num_filters[0], num_filters[1], n, stride=1)
        self.layer2 = make_stage(num_filters[1], num_filters[2], n, stride=2)
        self.layer3 = make_stage(num_filters[2], num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)  # 8x8 maps at the end for a 32x32 input
        self.fc = nn.Linear(num_filters[3], num_classes)
        self.pre_pool = nn.Identity()  # the map the classifier's pooling reads (SDD hooks it); no state
        he_normal_init_(self)  # the Linear keeps PyTorch's default, as in RepDistiller

    def get_feat_modules(self) -> nn.ModuleList:
        """Every module before the classifier (trained alone in the AB and FSP init stages)."""
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last block's ``bn2`` in each stage.

        Its output plus the shortcut is what the stage-ending ReLU reads (the ``preact`` feature); the BN
        output alone equals it only where the shortcut is zero.
        """
        return [stage[-1].bn2 for stage in (self.layer1, self.layer2, self.layer3)]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | FeatureOutput:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, c0, 32, 32)
        feats = [x]
        for stage in (self.layer1, self.layer2, self.layer3):
            x, feat = run_stage(stage, x, preact)  # (B, c1, 32, 32), (B, c2, 16, 16), (B, c3, 8, 8)
            feats.append(feat)
        x = self.avgpool(self.pre_pool(x)).flatten(1)  # (B, c3)
        feats.append(x)
        logits = self.fc(x)
        return FeatureOutput(feats, logits) if is_feat else logits

    def forward_from(
        self, x: Tensor, start: int, is_feat: bool = False, preact: bool = False
    ) -> Tensor | FeatureOutput:
        """The rest of the network from feature ``start`` (0: the stem, 1-3: a stage; post-activation, as
        ``forward(., is_feat=True).feats[start]``): the later stages and the classifier on ``x``, for methods
        that pass another network's features through this one (FCFD). Logits, or with ``is_feat`` the later
        stages' outputs (before their ReLU with ``preact``, as ``forward``), the pooled vector and the logits.
        Parameter-free; skips ``pre_pool`` so that a hook on it (SDD) sees only the model's own forward."""
        x, feats = run_stages_from((self.layer1, self.layer2, self.layer3), x, start, preact)
        x = self.avgpool(x).flatten(1)  # (B, c3)
        feats.append(x)
        logits = self.fc(x)
        return FeatureOutput(feats, logits) if is_feat else logits


def resnet8(num_classes: int = 100) -> ResNet:
    return ResNet(8, [16, 16, 32, 64], num_classes=num_classes)


def resnet14(num_classes: int = 100) -> ResNet:
    return ResNet(14, [16, 16, 32, 64], num_classes=num_classes)


def resnet20(num_classes: int = 100) -> ResNet:
    return ResNet(20, [16, 16, 32, 64], num_classes=num_classes)


def resnet32(num_classes: int = 100) -> ResNet:
    return ResNet(32, [16, 16, 32, 64], num_classes=num_classes)


def resnet44(num_classes: int = 100) -> ResNet:
    return ResNet(44, [16, 16, 32, 64], num_classes=num_classes)


def resnet56(num_classes: int = 100) -> ResNet:
    return ResNet(56, [16, 16, 32, 64], num_classes=num_classes)


def resnet110(num_classes: int = 100) -> ResNet:
    return ResNet(110, [16, 16, 32, 64], num_classes=num_classes)


def resnet8x4(num_classes: int = 100) -> ResNet:
    return ResNet(8, [32, 64, 128, 256], num_classes=num_classes)


def resnet32x4(num_classes: int = 100) -> ResNet:
    return ResNet(32, [32, 64, 128, 256], num_classes=num_classes)
