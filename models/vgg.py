"""VGG with BatchNorm for CIFAR, fully connected layers removed: vgg8, vgg11, vgg13, vgg16, vgg19.

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015,
arXiv 1409.1556, Table 1 (configurations A = 11, B = 13, D = 16, E = 19 weight layers) with BN after every
conv (Ioffe and Szegedy 2015, arXiv 1502.03167); "S" (vgg8) is RepDistiller's one-conv-per-block variant.
The three 4096-wide FC layers are replaced by global average pooling and one Linear(512, classes). Module
names follow RepDistiller's ``models/vgg.py`` (``block0.0``, ..., ``classifier``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import FeatureOutput, check_start, he_normal_init_

# Output channels of the convs in each of the five blocks.
CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "S": ((64,), (128,), (256,), (512,), (512,)),
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def make_block(widths: tuple[int, ...], in_channels: int) -> nn.Sequential:
    """conv3x3(bias)-BN-ReLU repeated, without the last ReLU: the forward applies it, so that the block's
    output is the pre-activation feature."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv blocks; 2x2 max-pool after blocks 0, 1, 2 (and after block 3 only for 64x64 inputs), then
    global average pooling and the classifier.

    ``forward(x, is_feat=True)`` features, per sample for a 32x32 input: block0 (64, 32, 32) after its
    ReLU, blocks 1-4 (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4) after their ReLU (before the
    pooling), pooled (512,). With ``preact=True`` blocks 1-4 are taken before their ReLU, i.e. the outputs
    of the BNs returned by :meth:`get_bn_before_relu`. Blocks 3 and 4 both run at 4x4 on CIFAR because
    ``pool3`` is skipped unless the input is 64 pixels high (RepDistiller's rule).
    """

    def __init__(self, cfg: tuple[tuple[int, ...], ...], *, num_classes: int = 100):
        super().__init__()
        in_channels = [3] + [widths[-1] for widths in cfg[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            make_block(widths, c) for widths, c in zip(cfg, in_channels)
        )
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        self.pre_pool = nn.Identity()  # the map the classifier's pooling reads (SDD hooks it); no state
        he_normal_init_(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)  # RepDistiller's classifier init
        nn.init.zeros_(self.classifier.bias)

    def get_feat_modules(self) -> nn.ModuleList:
        """Every module before the classifier, blocks and pools interleaved."""
        blocks = (self.block0, self.block1, self.block2, self.block3, self.block4)
        pools = (self.pool0, self.pool1, self.pool2, self.pool3, self.pool4)
        return nn.ModuleList([m for pair in zip(blocks, pools) for m in pair])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last BN of blocks 1-4: their outputs are exactly the ``preact`` features."""
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False) -> Tensor | FeatureOutput:
        height = x.shape[2]
        x = F.relu(self.block0(x))  # (B, 64, 32, 32)
        feats = [x]
        pools = (self.pool0, self.pool1, self.pool2, self.pool3)
        for i, (pool, block) in enumerate(zip(pools, (self.block1, self.block2, self.block3, self.block4))):
            if i < 3 or height == 64:  # RepDistiller skips pool3 on 32x32 inputs
                x = pool(x)
            pre = block(x)  # (B, 128, 16, 16), (B, 256, 8, 8), (B, 512, 4, 4), (B, 512, 4, 4)
            x = F.relu(pre)
            feats.append(pre if preact else x)
        x = self.pool4(self.pre_pool(x)).flatten(1)  # (B, 512)
        feats.append(x)
        logits = self.classifier(x)
        return FeatureOutput(feats, logits) if is_feat else logits

    def forward_from(
        self, x: Tensor, start: int, is_feat: bool = False, preact: bool = False
    ) -> Tensor | FeatureOutput:
        """The rest of the network from feature ``start`` (0: block0, 1-4: blocks 1-4), given after its ReLU
        (``forward(., is_feat=True).feats[start]``) or before it (``preact=True``'s feature: the ReLU comes first,
        as in the official FCFD's ``vgg.py`` ``stage_forward``): logits, or with ``is_feat`` the later blocks'
        outputs (before their ReLU with ``preact``), the pooled vector and the logits. ``pool3`` runs, as in
        ``forward``, only for 64-pixel inputs (read from ``x``'s size). Parameter-free; skips ``pre_pool``."""
        blocks = (self.block1, self.block2, self.block3, self.block4)
        pools = (self.pool0, self.pool1, self.pool2, self.pool3)
        check_start(start, len(blocks))
        height = x.shape[2] << min(start, 3)  # the input's: a 2x2 max-pool after each of blocks 0-2
        feats = []
        for i in range(start, len(blocks)):
            x = F.relu(x)
            if i < 3 or height == 64:
                x = pools[i](x)
            x = blocks[i](x)
            feats.append(x if preact else F.relu(x))
        x = self.pool4(F.relu(x)).flatten(1)  # (B, 512)
        feats.append(x)
        logits = self.classifier(x)
        return FeatureOutput(feats, logits) if is_feat else logits


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["S"], num_classes=num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["A"], num_classes=num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["B"], num_classes=num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["D"], num_classes=num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    return VGG(CONFIGS["E"], num_classes=num_classes)
