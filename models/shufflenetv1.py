"""ShuffleNet (v1) for CIFAR, groups = 3: ``ShuffleV1``.

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices", CVPR
2018, arXiv 1707.01083, Table 1 (g = 3: stage widths 240, 480, 960 with 4, 8, 4 units). CIFAR variant as in
RepDistiller's ``models/ShuffleNetv1.py``: a 1x1 stem without stride or max-pool, so the stages run at 16, 8
and 4 pixels, and a ReLU after the depthwise conv's BN (the paper has none there). PyTorch's default
initialisation, as RepDistiller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureOutput, PreactBlock, channel_shuffle, run_stage, run_stages_from


class Bottleneck(PreactBlock):
    """Grouped 1x1 - BN - ReLU - shuffle - 3x3 depthwise (stride) - BN - ReLU - grouped 1x1 - BN, then the
    shortcut: added (stride 1) or, at stride 2, a 3x3 average pool concatenated after the new channels.

    ``group_input=False`` makes the first 1x1 conv ungrouped, for the first unit that reads the narrow stem
    output (paper, section 3.3).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, group_input: bool = True):
        super().__init__()
        mid_planes = out_planes // 4  # bottleneck width = 1/4 of the output (paper, section 3.3)
        self.input_groups = groups if group_input else 1
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=self.input_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def pre_activation(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.input_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        # (B, out_planes + in_planes, H / 2, W / 2) at stride 2, (B, out_planes, H, W) otherwise
        return torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut


class ShuffleNet(nn.Module):
    """ShuffleNet v1 for 32x32 inputs.

    ``forward(x, is_feat=True)`` features, per sample for ShuffleV1: stem (24, 32, 32), stage outputs
    (240, 16, 16), (480, 8, 8), (960, 4, 4), pooled (960,). With ``preact=True`` the stage outputs are
    replaced by the last unit's sum (BN output + identity shortcut) before its ReLU.
    """

    def __init__(
        self,
        out_planes: tuple[int, ...] = (240, 480, 960),
        num_blocks: tuple[int, ...] = (4, 8, 4),
        groups: int = 3,
        *,
        num_classes: int = 100,
    ):
        super().__init__()
        stem = 24
        self.conv1 = nn.Conv2d(3, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        in_planes = stem
        stages = []
        for planes, blocks in zip(out_planes, num_blocks):
            # The first unit concatenates its input, so it only adds ``planes - in_planes`` channels.
            units = [Bottleneck(in_planes, planes - in_planes, 2, groups, group_input=in_planes != stem)]
            units += [Bottleneck(planes, planes, 1, groups) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*units))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_planes, num_classes)
        self.pre_pool = nn.Identity()  # the map the classifier's pooling reads (SDD hooks it); no state

    def stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3)

    def get_feat_modules(self) -> nn.ModuleList:
        """Every module before the classifier (trained alone in the AB and FSP init stages)."""
        return nn.ModuleList([self.conv1, self.bn1, *self.stages()])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last unit's ``bn3`` in each stage.

        The stage-ending ReLU reads that BN's output plus the identity shortcut (the ``preact`` feature), as
        with the CIFAR ResNets' ``bn2``; the last unit of a stage always has stride 1, so it adds rather than
        concatenates and the BN has the stage's full width. RepDistiller raises NotImplementedError here.
        """
        return [stage[-1].bn3 for stage in self.stages()]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | FeatureOutput:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 24, 32, 32)
        feats = [x]
        for stage in self.stages():
            x, feat = run_stage(stage, x, preact)  # (B, 240, 16, 16), (B, 480, 8, 8), (B, 960, 4, 4)
            feats.append(feat)
        x = F.avg_pool2d(self.pre_pool(x), 4).flatten(1)  # (B, 960)
        feats.append(x)
        logits = self.linear(x)
        return FeatureOutput(feats, logits) if is_feat else logits

    def forward_from(
        self, x: Tensor, start: int, is_feat: bool = False, preact: bool = False
    ) -> Tensor | FeatureOutput:
        """The rest of the network from feature ``start`` (0: the stem, 1-3: a stage), given after its ReLU
        (``forward(., is_feat=True).feats[start]``) or before it (``preact=True``'s feature: the ReLU comes first,
        as in the official FCFD's ``ShuffleNetv1.py``, whose units open with it): logits, or with ``is_feat`` the
        later stages' outputs (before their ReLU with ``preact``), the pooled vector and the logits.
        Parameter-free; skips ``pre_pool``."""
        x, feats = run_stages_from(self.stages(), F.relu(x), start, preact)  # x: after the ReLU
        x = F.avg_pool2d(x, 4).flatten(1)  # (B, 960)
        feats.append(x)
        logits = self.linear(x)
        return FeatureOutput(feats, logits) if is_feat else logits


def ShuffleV1(num_classes: int = 100) -> ShuffleNet:
    return ShuffleNet((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)
