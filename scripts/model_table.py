"""Print a Markdown table of the model zoo: parameters, multiply-accumulates and feature shapes.

MACs are for one 3x32x32 image, measured with ``torch.utils.flop_counter.FlopCounterMode`` (which counts
convolutions and matrix products, not BN, pooling or activations) as FLOPs / 2. Feature shapes are the
per-sample shapes of ``model(x, is_feat=True).feats``.

Usage: ``python scripts/model_table.py [--num-classes 100]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from models import create_model, feature_shapes, model_names  # noqa: E402


def count_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> int:
    """Multiply-accumulates of one eval-mode forward of a single image."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def table_rows(num_classes: int = 100) -> list[str]:
    rows = [
        "| model | parameters | MACs (3x32x32) | features (per sample, is_feat=True) |",
        "|---|---:|---:|---|",
    ]
    for name in model_names():
        model = create_model(name, num_classes=num_classes)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shapes = " ".join("x".join(str(d) for d in shape) for shape in feature_shapes(model))
        rows.append(f"| {name} | {params:,} | {count_macs(model) / 1e6:,.1f} M | {shapes} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=100)
    args = parser.parse_args()
    print("\n".join(table_rows(args.num_classes)))


if __name__ == "__main__":
    main()
