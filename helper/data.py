"""Build the data pipeline of a run from its flags."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dataset import DeviceLoader, load_cifar100, resolve_data_folder, split_indices

log = logging.getLogger("kd")


@dataclass
class RunData:
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    val_loader: DeviceLoader | None
    n_data: int  # training images held (CRD's memory size)


def build_data(
    args: argparse.Namespace,
    device: torch.device,
    seed: int,
    sampler: Callable[..., Any] | None = None,
    two_views: bool = False,
) -> RunData:
    """Load CIFAR-100, take the subset and validation split, and put the loaders on ``device``.

    ``sampler(args, labels, seed, device)``: the contrast sampler of the method that needs one (its
    ``make_sampler``); ``two_views``: every training image also as a strong view. The training subset is
    re-indexed 0..n-1, so ``Batch.index`` addresses rows of CRD's memory directly.
    """
    data = load_cifar100(resolve_data_folder(args.data_folder))
    train_idx, val_idx = split_indices(data.train_labels, args.train_size, args.val_size, seed)
    images, labels = data.train_images[train_idx], data.train_labels[train_idx]
    memory_format = torch.channels_last if args.channels_last else None
    # Large evaluation batches pay off on a GPU; on a CPU, 100 measured 2-4x faster than 1000 (cache-sized).
    eval_batch = args.eval_batch_size or (1000 if device.type == "cuda" else 100)
    crd = sampler(args, labels, seed, device) if sampler else None
    train = DeviceLoader(
        images, labels, args.batch_size, device, train=True, seed=seed, drop_last=args.drop_last, crd=crd,
        memory_format=memory_format, strong_view=two_views,
    )  # fmt: skip
    test_images, test_labels = data.test_images, data.test_labels
    if args.test_size:
        (test_idx, _) = split_indices(test_labels, args.test_size, 0, seed)
        test_images, test_labels = test_images[test_idx], test_labels[test_idx]
    test = DeviceLoader(
        test_images, test_labels, eval_batch, device, train=False, seed=seed,
        memory_format=memory_format,
    )  # fmt: skip
    val = None
    if len(val_idx):
        val = DeviceLoader(
            data.train_images[val_idx], data.train_labels[val_idx], eval_batch, device, train=False,
            seed=seed, memory_format=memory_format,
        )  # fmt: skip
    log.info(
        "data: %d training, %d validation, %d test images from %s", len(labels), len(val_idx),
        len(test_labels), data.root,
    )  # fmt: skip
    return RunData(train, test, val, len(labels))
