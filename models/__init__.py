"""The model zoo: RepDistiller's 22 CIFAR-100 architectures under RepDistiller's names.

``model_dict[name](num_classes=100)`` builds a model; its ``state_dict`` has exactly the keys and shapes of
RepDistiller's model of that name, so published checkpoints load with ``strict=True``. Every model's
``forward(x, is_feat=False, preact=False)`` returns logits, or with ``is_feat`` a :class:`FeatureOutput`
(stem, each stage, pooled vector), and every model has ``get_feat_modules()`` and ``get_bn_before_relu()``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from .common import FeatureOutput
from .mobilenetv2 import mobile_half
from .resnet import resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44, resnet56, resnet110
from .resnetv2 import ResNet50
from .shufflenetv1 import ShuffleV1
from .shufflenetv2 import ShuffleV2
from .vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "FeatureOutput",
    "create_model",
    "feature_shapes",
    "model_dict",
    "model_names",
    "teacher_name_from_path",
]

# Read-only: the registry is fixed at import time.
model_dict: MappingProxyType[str, Callable[..., nn.Module]] = MappingProxyType(
    {
        "resnet8": resnet8,
        "resnet14": resnet14,
        "resnet20": resnet20,
        "resnet32": resnet32,
        "resnet44": resnet44,
        "resnet56": resnet56,
        "resnet110": resnet110,
        "resnet8x4": resnet8x4,
        "resnet32x4": resnet32x4,
        "ResNet50": ResNet50,
        "wrn_16_1": wrn_16_1,
        "wrn_16_2": wrn_16_2,
        "wrn_40_1": wrn_40_1,
        "wrn_40_2": wrn_40_2,
        "vgg8": vgg8,
        "vgg11": vgg11,
        "vgg13": vgg13,
        "vgg16": vgg16,
        "vgg19": vgg19,
        "MobileNetV2": mobile_half,
        "ShuffleV1": ShuffleV1,
        "ShuffleV2": ShuffleV2,
    }
)


def model_names() -> list[str]:
    """The registered names, in registry order."""
    return list(model_dict)


def create_model(name: str, num_classes: int = 100) -> nn.Module:
    """Build the model registered as ``name``; an unknown name raises ValueError listing the valid ones."""
    if name not in model_dict:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(model_names())}")
    return model_dict[name](num_classes=num_classes)


def teacher_name_from_path(path: str | Path) -> str:
    """The architecture of a teacher checkpoint from its folder name, as RepDistiller's ``get_teacher_name``.

    The parent folder is split on ``_``: its first token is the name (``resnet32x4_vanilla`` ->
    ``resnet32x4``), except for WRNs, whose name is the first three tokens (``wrn_40_2_vanilla`` ->
    ``wrn_40_2``). A convention of folder names only: prefer an architecture stored in the checkpoint.
    """
    segments = Path(path).parent.name.split("_")
    return "_".join(segments[:3]) if segments[0] == "wrn" else segments[0]


def feature_shapes(
    model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32), preact: bool = False
) -> list[torch.Size]:
    """Per-sample shapes of ``model(x, is_feat=True, preact=preact).feats`` for inputs of ``input_size``.

    Runs two random images (from a private generator: the global RNG is untouched) in eval mode without
    gradients on the model's device and dtype, and restores the model's train/eval mode afterwards.
    """
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_size, generator=generator).to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats, _ = model(x, is_feat=True, preact=preact)
    finally:
        model.train(was_training)
    return [f.shape[1:] for f in feats]
