"""Batches made on the training device: the whole (sub)set is one uint8 tensor there, and each batch is
shuffled, randomly cropped, flipped and normalised in a few vectorised tensor ops.

The distribution is that of RepDistiller's PIL pipeline (``dataset/cifar100.py``): ``RandomCrop(32,
padding=4)`` (zero padding, top and left offsets uniform in 0..8), then ``RandomHorizontalFlip()`` (p = 0.5),
then ``ToTensor()`` (/255) and ``Normalize(mean, std)``. Given the same draws, :func:`augment` is bitwise equal to
that pipeline (the float ops are the same, in the same order).

Reproducibility: every random draw of epoch ``e`` comes from ``(seed, e)``. The permutation and the crop and flip
draws are made on the CPU, so a run gives the same batches on any device; CRD's negatives are drawn on the
device, seeded per batch from ``(seed, e, batch)``, so they are reproducible on one kind of device. Resuming needs
only the epoch number (and the batch, mid-epoch): see :meth:`DeviceLoader.epoch` and ``state_dict``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .batch import Batch
from .crd import CRDSampler
from .randaugment import StrongDraws, apply_strong, draw_strong

log = logging.getLogger(__name__)

# Per-channel mean and std of the CIFAR-100 training images (RGB, pixel values / 255), as RepDistiller's
# dataset/cifar100.py writes them (the exact values are 0.50708, 0.48655, 0.44092 and 0.26733, 0.25644, 0.27615).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
PAD = 4  # RandomCrop(32, padding=4), RepDistiller dataset/cifar100.py
_AUGMENT_STREAM, _CRD_STREAM, _STRONG_STREAM = 0, 1, 2  # independent seed streams derived from (seed, epoch)


class EpochPlan(NamedTuple):
    """Every random draw of one training epoch except CRD's; position i is the i-th image served."""

    perm: torch.Tensor  # (N,) int64: which subset image is served at each position
    dx: torch.Tensor  # (N,) int64 in 0..2*PAD: left edge of the crop in the zero-padded image
    dy: torch.Tensor  # (N,) int64 in 0..2*PAD: top edge of the crop
    flip: torch.Tensor  # (N,) bool: mirror the crop left-right


def derive_seed(*keys: int) -> int:
    """A 64-bit seed mixed from non-negative integers, so that (seed, epoch, stream) triples never collide."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0])


def _channel_stat(values: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)  # (1, C, 1, 1)


def normalize(
    images_uint8: torch.Tensor,
    mean: Sequence[float] | torch.Tensor = CIFAR100_MEAN,
    std: Sequence[float] | torch.Tensor = CIFAR100_STD,
    memory_format: torch.memory_format | None = None,
) -> torch.Tensor:
    """``ToTensor()`` then ``Normalize(mean, std)`` on a uint8 batch (B, C, H, W); returns float32 (B, C, H, W)."""
    if memory_format is not None:
        images_uint8 = images_uint8.contiguous(memory_format=memory_format)  # cheaper on uint8 than on float
    x = images_uint8.to(torch.float32).div_(255)  # ToTensor
    return x.sub_(_channel_stat(mean, x)).div_(_channel_stat(std, x))  # Normalize: (x - mean) / std


def augment(
    images_uint8: torch.Tensor,
    dx: torch.Tensor,
    dy: torch.Tensor,
    flip: torch.Tensor,
    mean: Sequence[float] | torch.Tensor = CIFAR100_MEAN,
    std: Sequence[float] | torch.Tensor = CIFAR100_STD,
    memory_format: torch.memory_format | None = None,
    pad: int = PAD,
) -> torch.Tensor:
    """Random crop (zero padding ``pad``), horizontal flip and normalisation of a uint8 batch (B, C, H, W).

    Image b is cropped at top ``dy[b]`` and left ``dx[b]`` (both in 0..2*pad) of the padded image, mirrored if
    ``flip[b]``, then normalised; returns float32 (B, C, H, W).
    """
    return normalize(crop_flip(images_uint8, dx, dy, flip, pad), mean, std, memory_format)


def crop_flip(
    images_uint8: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor, pad: int = PAD
) -> torch.Tensor:
    """The crop and flip of :func:`augment` without the normalisation: uint8 (B, C, H, W) in and out.

    One gather does crop and flip together.
    """
    b, c, h, w = images_uint8.shape
    padded = F.pad(images_uint8, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zeros like RandomCrop's fill=0
    width = w + 2 * pad
    ar_h = torch.arange(h, device=images_uint8.device)
    ar_w = torch.arange(w, device=images_uint8.device)
    rows = dy[:, None] + ar_h  # (B, H): padded row of each output row
    # Flipping after cropping reads the crop's columns right to left.
    cols = dx[:, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # (B, W)
    flat = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)  # (B, C, H*W)
    return padded.view(b, c, -1).gather(2, flat).view(b, c, h, w)  # (B, C, H, W) uint8


class DeviceLoader:
    """Iterates over a (sub)set of images held on ``device`` as :class:`Batch` tuples.

    ``images_uint8`` (N, C, H, W) and ``labels`` (N,) are the images this loader serves; ``indices`` (N,) are
    their positions in the full training set (``Batch.index``, CRD's memory rows), by default 0..N-1.
    ``train=True``: reshuffled and augmented every epoch, CRD's ``contrast_idx`` attached when ``crd`` is given.
    ``train=False``: the images in order, normalised only. The last partial batch is kept unless ``drop_last``.
    ``strong_view=True`` (training only) adds ``Batch.input_strong``: a second view of each image with its own
    crop and flip, then RandAugment(2) and Cutout (MLKD's strong view, :mod:`dataset.randaugment`).
    """

    def __init__(
        self,
        images_uint8: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        batch_size: int,
        device: torch.device | str,
        train: bool,
        seed: int = 0,
        drop_last: bool = False,
        crd: CRDSampler | None = None,
        indices: torch.Tensor | np.ndarray | None = None,
        mean: Sequence[float] = CIFAR100_MEAN,
        std: Sequence[float] = CIFAR100_STD,
        memory_format: torch.memory_format | None = None,
        strong_view: bool = False,
    ) -> None:
        images = torch.as_tensor(images_uint8)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        n = len(images)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (n,):
            raise ValueError(f"{n} images but labels of shape {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if crd is not None and not train:
            raise ValueError("CRD sampling belongs to the training loader (train=True)")
        if strong_view and not train:
            raise ValueError("the strong view belongs to the training loader (train=True)")
        self.strong_view = strong_view
        self.device = torch.device(device)
        self.batch_size, self.train, self.seed, self.drop_last = batch_size, train, seed, drop_last
        self.crd, self.memory_format = crd, memory_format
        self.images = images.to(self.device)  # (N, C, H, W) uint8, the whole set on the device
        self.labels = labels.to(self.device)  # (N,)
        indices = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        if indices.shape != (n,):
            raise ValueError(f"{n} images but indices of shape {tuple(indices.shape)}")
        if crd is not None and not torch.equal(crd.indices.cpu(), indices):
            raise ValueError("the CRD sampler was built over other images (or other indices) than this loader's")
        self.indices = indices.to(self.device)  # (N,) positions in the full training set
        self._mean = _channel_stat(mean, self.images)  # (1, C, 1, 1) float32
        self._std = _channel_stat(std, self.images)
        self.next_epoch = 0  # the epoch a plain `for batch in loader` serves next

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.drop_last:
            return self.num_images // self.batch_size
        return math.ceil(self.num_images / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(self.next_epoch)

    def plan(self, epoch: int) -> EpochPlan:
        """The shuffle, crop and flip draws of ``epoch`` (on the CPU, hence the same on every device)."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _AUGMENT_STREAM))
        n, span = self.num_images, 2 * PAD + 1
        perm = torch.randperm(n, generator=gen)
        dx = torch.randint(0, span, (n,), generator=gen)
        dy = torch.randint(0, span, (n,), generator=gen)
        flip = torch.randint(0, 2, (n,), generator=gen).bool()  # p = 0.5, RandomHorizontalFlip's default
        return EpochPlan(perm, dx, dy, flip)

    def strong_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StrongDraws]:
        """The strong view's draws of ``epoch`` (crop, flip, RandAugment, Cutout), position i as in :meth:`plan`.

        A stream of their own, so the weak view's draws are those of a one-view run with the same seed.
        """
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _STRONG_STREAM))
        n, span = self.num_images, 2 * PAD + 1
        dx = torch.randint(0, span, (n,), generator=gen)
        dy = torch.randint(0, span, (n,), generator=gen)
        flip = torch.randint(0, 2, (n,), generator=gen).bool()
        h, w = self.images.shape[-2:]
        return dx, dy, flip, draw_strong(n, gen, height=h, width=w)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch``, from batch ``start_batch`` on (resuming mid-epoch gives the same batches).

        In training mode the draws depend on (seed, epoch) only; in evaluation mode ``epoch`` is unused.
        """
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be non-negative, got {epoch} and {start_batch}")
        self.next_epoch = epoch + 1
        if self.train:
            return self._train_batches(epoch, start_batch)
        return self._eval_batches(start_batch)

    def _eval_batches(self, start_batch: int) -> Iterator[Batch]:
        for i in range(start_batch, len(self)):
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            x = normalize(self.images[s], self._mean, self._std, self.memory_format)
            yield Batch(x, self.labels[s], self.indices[s])

    def _train_batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        perm, dx, dy, flip = (t.to(self.device) for t in self.plan(epoch))
        crd_gen = crd_seeds = None
        if self.crd is not None:
            crd_gen = torch.Generator(device=self.device)
            crd_seeds = np.random.SeedSequence([self.seed, epoch, _CRD_STREAM]).generate_state(
                max(len(self), 1), dtype=np.uint64
            )
        strong = None
        if self.strong_view:
            sdx, sdy, sflip, sdraws = self.strong_plan(epoch)
            sdraws = StrongDraws(*(t.to(self.device) for t in sdraws))  # once per epoch, not per batch
            strong = (sdx.to(self.device), sdy.to(self.device), sflip.to(self.device), sdraws)
        for i in range(start_batch, len(self)):
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            sel = perm[s]  # (B,) positions in this loader's set
            images = self.images.index_select(0, sel)  # (B, C, H, W) uint8
            x = augment(images, dx[s], dy[s], flip[s], self._mean, self._std, self.memory_format)
            target, index = self.labels[sel], self.indices[sel]
            contrast = x_strong = None
            if self.crd is not None:
                crd_gen.manual_seed(int(crd_seeds[i]))  # per batch: any batch can be redrawn on its own
                contrast = self.crd.sample(index, target, crd_gen)
            if strong is not None:
                sdx, sdy, sflip, sdraws = strong
                view = apply_strong(crop_flip(images, sdx[s], sdy[s], sflip[s]), StrongDraws(*(t[s] for t in sdraws)))
                x_strong = normalize(view, self._mean, self._std, self.memory_format)
            yield Batch(x, target, index, contrast, x_strong)
