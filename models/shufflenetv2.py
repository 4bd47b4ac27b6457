"""ShuffleNet V2 (1x) for CIFAR: ``ShuffleV2``.

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV 2018, arXiv
1807.11164, Table 5 (output widths per size; 4/8/4 units per stage, i.e. one downsampling unit and 3/7/3
basic units). CIFAR variant as in RepDistiller's ``models/ShuffleNetv2.py``: a 1x1 stem without stride or
max-pool, so the stages run at 16, 8 and 4 pixels. PyTorch's default initialisation, as RepDistiller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureOutput, PreactBlock, channel_shuffle, run_stage, run_stages_from

# Stage widths and the last 1x1 conv's width, per size (paper, Table 5).
CONFIGS: dict[float, dict[str, tuple[int, ...]]] = {
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class BasicBlock(PreactBlock):
    """Basic unit (paper, Fig. 3c): split the channels in two halves; the right half goes through
    1x1 - BN - ReLU - 3x3 depthwise - BN - 1x1 - BN - ReLU; concatenate with the untouched left half and
    shuffle the channels of the two halves together.

    The pre-activation (``forward(x, preact=True)``) is ``cat(left, bn3 output)`` before the shuffle, as
    RepDistiller returns it; :meth:`activate` applies the ReLU to the right half and shuffles.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def pre_activation(self, x: Tensor) -> Tensor:
        c = int(x.shape[1] * self.split_ratio)
        left, right = x[:, :c], x[:, c:]
        right = F.relu(self.bn1(self.conv1(right)))
        right = self.bn2(self.conv2(right))
        right = self.bn3(self.conv3(right))
        return torch.cat([left, right], 1)  # (B, C, H, W), not shuffled

    def activate(self, pre: Tensor) -> Tensor:
        left = pre.shape[1] - self.bn3.num_features
        out = torch.cat([pre[:, :left], F.relu(pre[:, left:])], 1)
        return channel_shuffle(out, 2)


class DownBlock(nn.Module):
    """Downsampling unit (paper, Fig. 3d): left 3x3 depthwise (stride 2) - BN - 1x1 - BN - ReLU, right
    1x1 - BN - ReLU - 3x3 depthwise (stride 2) - BN - 1x1 - BN - ReLU; concatenate and shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)  # (B, out_channels, H / 2, W / 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 of size ``net_size`` (a key of :data:`CONFIGS`) for 32x32 inputs.

    ``forward(x, is_feat=True)`` features, per sample for ShuffleV2: stem (24, 32, 32), stage outputs
    (116, 16, 16), (232, 8, 8), (464, 4, 4), pooled (1024,). With ``preact=True`` the stage outputs are
    replaced by the last unit's ``cat(left half, right branch before its ReLU)``.

    Known fault kept for compatibility: RepDistiller takes that pre-activation before the channel shuffle, so
    its channel order differs from the post-activation feature's (channel ``i`` of one is not channel ``i``
    of the other). ``shuffle_preact=True`` shuffles it too, so that ``relu(preact) == feature`` channel by
    channel; the default (False) keeps RepDistiller's order.
    """

    def __init__(self, net_size: float = 1, num_classes: int = 100, shuffle_preact: bool = False):
        super().__init__()
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]
        self.shuffle_preact = shuffle_preact
        stem = 24
        self.conv1 = nn.Conv2d(3, stem, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        in_channels = stem
        stages = []
        for width, blocks in zip(out_channels[:3], num_blocks):
            units = [DownBlock(in_channels, width), *(BasicBlock(width) for _ in range(blocks))]
            stages.append(nn.Sequential(*units))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(in_channels, out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.pre_pool = nn.Identity()  # the map the classifier's pooling reads (SDD hooks it); no state

    def stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3)

    def get_feat_modules(self) -> nn.ModuleList:
        """The stem and the three stages, as RepDistiller (``conv2``/``bn2`` are not included)."""
        return nn.ModuleList([self.conv1, self.bn1, *self.stages()])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last unit's right-branch ``bn3`` in each stage.

        In that unit only the right branch passes through a ReLU; its input is this BN's output. So the BN
        covers half of the stage's channels (58, 116, 232 for ShuffleV2): its output is the right half,
        channels ``C/2:``, of the (unshuffled) ``preact`` feature, while the left half is the unit's input
        passed through unchanged. RepDistiller raises NotImplementedError here.
        """
        return [stage[-1].bn3 for stage in self.stages()]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | FeatureOutput:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 24, 32, 32)
        feats = [x]
        for stage in self.stages():
            x, feat = run_stage(stage, x, preact)  # (B, 116, 16, 16), (B, 232, 8, 8), (B, 464, 4, 4)
            if preact and self.shuffle_preact:
                feat = channel_shuffle(feat, 2)
            feats.append(feat)
        x = F.relu(self.bn2(self.conv2(x)))  # (B, 1024, 4, 4)
        x = F.avg_pool2d(self.pre_pool(x), 4).flatten(1)  # (B, 1024)
        feats.append(x)
        logits = self.linear(x)
        return FeatureOutput(feats, logits) if is_feat else logits

    def forward_from(
        self, x: Tensor, start: int, is_feat: bool = False, preact: bool = False
    ) -> Tensor | FeatureOutput:
        """The rest of the network from feature ``start`` (0: the stem, 1-3: a stage; post-activation, as
        ``forward(., is_feat=True).feats[start]``): logits, or with ``is_feat`` the later stages' outputs
        (``preact`` as in ``forward``), the pooled vector and the logits. The stages are the official FCFD's
        (``ShuffleNetv2.py`` ``stage_forward``), but its last one ends after ``conv2``/``bn2`` and their ReLU
        (:meth:`head`). Parameter-free; skips ``pre_pool``."""
        x, feats = run_stages_from(self.stages(), x, start, preact)
        if preact and self.shuffle_preact:
            feats = [channel_shuffle(f, 2) for f in feats]
        x = F.avg_pool2d(self.head(x), 4).flatten(1)  # (B, 1024)
        feats.append(x)
        logits = self.linear(x)
        return FeatureOutput(feats, logits) if is_feat else logits

    def head(self, x: Tensor, preact: bool = False) -> Tensor:
        """The map the classifier pools, ``relu(bn2(conv2(x)))`` (B, 1024, 4, 4), from the last stage's output
        ``x`` (the official FCFD's last stage output, ``stage_forward(3, .)``); before the ReLU with ``preact``."""
        out = self.bn2(self.conv2(x))
        return out if preact else F.relu(out)


def ShuffleV2(num_classes: int = 100, shuffle_preact: bool = False) -> ShuffleNetV2:
    return ShuffleNetV2(net_size=1, num_classes=num_classes, shuffle_preact=shuffle_preact)
