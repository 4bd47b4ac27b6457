"""MobileNetV2 at half width for CIFAR ("mobile_half", registered as ``MobileNetV2``).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, arXiv 1801.04381,
Table 2 (the (t, c, n, s) settings below), in the CIFAR variant of Jin et al., "Knowledge Distillation via
Route Constrained Optimization", ICCV 2019, arXiv 1904.09149, that RepDistiller uses: expansion T = 6, width
0.5, a stride-2 stem, and every block (also t = 1) with an expanding 1x1 conv. Module names follow
RepDistiller's ``models/mobilenetv2.py``; unlike it, nothing is printed on construction.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureOutput, check_start, he_normal_init_


def conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand - BN - ReLU - 3x3 depthwise (stride) - BN - ReLU - 1x1 project - BN (linear bottleneck),
    plus the input when the shape is unchanged."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)  # (B, oup, H / stride, W / stride)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with expansion ``T`` and width multiplier ``width_mult`` for ``input_size`` inputs.

    ``forward(x, is_feat=True)`` features, per sample for mobile_half on 32x32: stem (16, 16, 16), outputs
    of block groups 1, 2, 4, 6: (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), pooled (1280,).
    ``preact`` is accepted and ignored, as in RepDistiller: the group outputs are linear-bottleneck outputs
    (BN plus, where shapes allow, the block input) that no ReLU follows, so there is no pre-activation to
    tap.
    """

    STAGE_ENDS = (1, 2, 4, 6)  # the block groups whose outputs are the stage features

    def __init__(self, T: int, num_classes: int = 100, input_size: int = 32, width_mult: float = 1.0):
        super().__init__()
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        # (t, c, n, s): expansion, output channels at width 1, blocks, stride of the first block. Table 2 of
        # Sandler et al. with the second group at stride 1 instead of 2, for 32x32 inputs.
        settings = [
            (1, 16, 1, 1),
            (T, 24, 2, 1),
            (T, 32, 3, 2),
            (T, 64, 4, 2),
            (T, 96, 3, 1),
            (T, 160, 3, 2),
            (T, 320, 1, 1),
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        # The last conv stays 1280 wide for width_mult <= 1 (Sandler et al., section 4).
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.pre_pool = nn.Identity()  # the map the classifier's pooling reads (SDD hooks it); no state
        # Total stride 16 (stem 2, then 2, 2, 2): a 32x32 input ends at 2x2.
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        he_normal_init_(self)
        nn.init.normal_(self.classifier[0].weight, 0.0, 0.01)  # RepDistiller's classifier init
        nn.init.zeros_(self.classifier[0].bias)

    def get_feat_modules(self) -> nn.ModuleList:
        """The stem and the inverted-residual blocks, as RepDistiller (``conv2`` is not included)."""
        return nn.ModuleList([self.conv1, self.blocks])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The projection BN of the last block of groups 1, 2, 4 and 6 (RepDistiller's choice).

        The feature is that BN's output plus the block input where the block has a residual connection
        (groups 1, 2 and 4), the BN output itself otherwise (group 6).
        """
        return [self.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | FeatureOutput:
        del preact  # no pre-activation to tap (see the class docstring)
        x = self.conv1(x)  # (B, 16, 16, 16)
        feats = [x]
        for i, group in enumerate(self.blocks):
            x = group(x)
            if i in self.STAGE_ENDS:  # (B, 12, 16, 16), (B, 16, 8, 8), (B, 48, 4, 4), (B, 160, 2, 2)
                feats.append(x)
        x = self.avgpool(self.pre_pool(self.conv2(x))).flatten(1)  # (B, 1280)
        feats.append(x)
        logits = self.classifier(x)
        return FeatureOutput(feats, logits) if is_feat else logits

    def forward_from(
        self, x: Tensor, start: int, is_feat: bool = False, preact: bool = False
    ) -> Tensor | FeatureOutput:
        """The rest of the network from feature ``start`` (0: the stem, 1-4: the output of block group 1, 2, 4
        or 6, as ``forward(., is_feat=True).feats[start]``): logits, or with ``is_feat`` the later stage features,
        the pooled vector and the logits (``preact`` ignored, as in ``forward``). The stages are the official
        FCFD's (``mobilenetv2.py`` ``stage_forward``: groups 0-1, 2, 3-4, 5-6), but its last one ends after
        ``conv2``'s BN (:meth:`head`). Parameter-free; skips ``pre_pool``."""
        del preact
        check_start(start, len(self.STAGE_ENDS))
        first = 0 if start == 0 else self.STAGE_ENDS[start - 1] + 1
        feats = []
        for i in range(first, len(self.blocks)):
            x = self.blocks[i](x)
            if i in self.STAGE_ENDS:
                feats.append(x)
        x = self.avgpool(self.conv2(x)).flatten(1)  # (B, 1280)
        feats.append(x)
        logits = self.classifier(x)
        return FeatureOutput(feats, logits) if is_feat else logits

    def head(self, x: Tensor, preact: bool = False) -> Tensor:
        """The map the classifier pools, ``conv2(x)`` (1x1 conv, BN, ReLU), from the last stage feature ``x``;
        before the ReLU with ``preact`` (the official FCFD's last stage output, ``stage_forward(4, .)``)."""
        conv, bn, _ = self.conv2
        out = bn(conv(x))  # (B, 1280, H, W)
        return out if preact else F.relu(out)


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 with T = 6 and width 0.5, RepDistiller's ``MobileNetV2`` student."""
    return MobileNetV2(T=6, num_classes=num_classes, width_mult=0.5)
