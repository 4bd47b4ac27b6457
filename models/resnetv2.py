"""ResNet50 for CIFAR: the ImageNet Bottleneck ResNet with a 3x3 stride-1 stem and no max-pool.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv 1512.03385, Table 1 (50-layer:
[3, 4, 6, 3] Bottlenecks, widths 64/128/256/512, expansion 4). The CIFAR stem keeps the 32x32 input at full
resolution, so the four stages run at 32, 16, 8 and 4 pixels. Module names follow RepDistiller's
``models/resnetv2.py`` (``shortcut``, ``linear``) so its ResNet50 teacher loads with ``strict=True``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureOutput, PreactBlock, he_normal_init_, run_stage, run_stages_from


class Bottleneck(PreactBlock):
    """1x1 reduce - 3x3 (stride) - 1x1 expand, each with BN; ReLU after the sum with the shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        # An empty Sequential is the identity; it keeps RepDistiller's key names (shortcut.0, shortcut.1).
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def pre_activation(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x)  # (B, 4 * planes, H / stride, W / stride)


class ResNet(nn.Module):
    """Bottleneck ResNet with a CIFAR stem.

    ``forward(x, is_feat=True)`` features, per sample for ResNet50: stem (64, 32, 32), stage outputs
    (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4), pooled (2048,). With ``preact=True`` the four
    stage outputs are replaced by the last block's residual sum before its ReLU. (RepDistiller returns
    that case wrapped as ``[[f0, ..., f5], logits]``; here it is the same :class:`FeatureOutput` as always.)

    ``zero_init_residual`` starts every residual branch at zero by zeroing the last BN's weight in each
    block (Goyal et al., 2017, arXiv 1706.02677, section 5.1); off by default, as in RepDistiller.
    """

    def __init__(self, num_blocks: list[int], *, num_classes: int = 100, zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        in_planes = 64
        stages = []
        for planes, blocks, stride in zip(widths, num_blocks, strides):
            stages.append(make_stage(in_planes, planes, blocks, stride))
            in_planes = planes * Bottleneck.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(in_planes, num_classes)
        self.pre_pool = nn.Identity()  # the map the classifier's pooling reads (SDD hooks it); no state
        he_normal_init_(self)  # the Linear keeps PyTorch's default, as in RepDistiller
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def get_feat_modules(self) -> nn.ModuleList:
        """Every module before the classifier (trained alone in the AB and FSP init stages)."""
        return nn.ModuleList([self.conv1, self.bn1, *self.stages()])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last block's ``bn3`` in each of the four stages.

        Its output plus the (identity) shortcut is what the stage-ending ReLU reads, i.e. the ``preact``
        feature; the BN output alone is not that feature.
        """
        return [stage[-1].bn3 for stage in self.stages()]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | FeatureOutput:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 64, 32, 32)
        feats = [x]
        for stage in self.stages():
            x, feat = run_stage(stage, x, preact)  # (B, 256, 32, 32) ... (B, 2048, 4, 4)
            feats.append(feat)
        x = self.avgpool(self.pre_pool(x)).flatten(1)  # (B, 2048)
        feats.append(x)
        logits = self.linear(x)
        return FeatureOutput(feats, logits) if is_feat else logits

    def forward_from(
        self, x: Tensor, start: int, is_feat: bool = False, preact: bool = False
    ) -> Tensor | FeatureOutput:
        """The rest of the network from feature ``start`` (0: the stem, 1-4: a stage; post-activation, as
        ``forward(., is_feat=True).feats[start]``): logits, or with ``is_feat`` the later stages' outputs (before
        their ReLU with ``preact``), the pooled vector and the logits. Parameter-free; skips ``pre_pool``.
        The official FCFD's stages (``resnetv2.py`` ``stage_forward``, ``stage_input = "afterrelu"``) are these."""
        x, feats = run_stages_from(self.stages(), x, start, preact)
        x = self.avgpool(x).flatten(1)  # (B, 2048)
        feats.append(x)
        logits = self.linear(x)
        return FeatureOutput(feats, logits) if is_feat else logits


def make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` Bottlenecks; the first one changes the width and resolution."""
    layers = [Bottleneck(in_planes, planes, stride)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def ResNet50(num_classes: int = 100, zero_init_residual: bool = False) -> ResNet:
    return ResNet([3, 4, 6, 3], num_classes=num_classes, zero_init_residual=zero_init_residual)
