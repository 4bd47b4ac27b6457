"""Seeding, RepDistiller's step-decay learning rate and its SGD."""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with ``deterministic``, also select deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True


def lr_schedule(base_lr: float, decay_epochs: list[int], rate: float) -> Callable[[int], float]:
    """RepDistiller's step decay: epoch ``e`` (1-based) uses ``base * rate ** #{d in decay_epochs : d < e}``."""
    return lambda epoch: base_lr * rate ** sum(epoch > d for d in decay_epochs)


def sgd(modules: list[nn.Module], lr: float, args: argparse.Namespace) -> torch.optim.SGD:
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
