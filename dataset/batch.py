"""The batch that the data pipeline hands to the training engine."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    input: torch.Tensor  # (B, 3, 32, 32) float, normalised
    target: torch.Tensor  # (B,) int64 class labels
    index: torch.Tensor  # (B,) int64 positions in the training set (CRD memory rows)
    contrast_idx: torch.Tensor | None = None  # (B, K+1) int64; column 0 the positive (CRD only)
    input_strong: torch.Tensor | None = None  # (B, 3, 32, 32) float: a second, strongly augmented view (--two_views)
