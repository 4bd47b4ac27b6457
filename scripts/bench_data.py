"""Throughput of the training data pipelines, measured side by side in one run, printed as Markdown tables.

    python scripts/bench_data.py                       # on CUDA when available, else the CPU
    python scripts/bench_data.py --device cpu --batches 300 --data_folder ../shared/data

1. ``DeviceLoader``: the training set as one uint8 tensor on the device; shuffle, crop, flip, normalise per batch.
2. The same with CRD's contrast indices (``--nce_k``, 16384 as in RepDistiller's scripts).
3. RepDistiller's way: a map-style dataset over the same arrays, PIL ``RandomCrop(32, padding=4)``,
   ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize``, in a shuffled ``DataLoader`` (batch 64,
   ``--workers`` processes; RepDistiller uses 8, this default of 2 matches a 2-core machine).
4. CRD sampling alone for one batch over the full training set: ours against RepDistiller's per-sample
   ``numpy.random.choice(negatives, K, replace=False)`` followed by the DataLoader's collation.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_data")


class PILCIFAR(Dataset):
    """What RepDistiller's ``CIFAR100Instance`` does per item: a PIL image through the transforms."""

    def __init__(self, images_hwc: np.ndarray, labels: list[int], transform: Callable) -> None:
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i], i


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(batches: Iterator, count: int, device: torch.device, warmup: int = 2) -> float:
    """Pull ``warmup`` batches untimed (worker start-up, first allocations), then time ``count`` batches."""
    for _ in range(warmup):
        next(batches)
    _sync(device)
    images, start = 0, time.perf_counter()
    for _ in range(count):
        images += len(next(batches)[0])
    _sync(device)
    return images / (time.perf_counter() - start)


def _forever(loader) -> Iterator:
    while True:
        yield from loader


def seconds_per_call(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def repdistiller_crd_batch(negatives: list[np.ndarray], index: np.ndarray, target: np.ndarray, k: int):
    """RepDistiller's ``CIFAR100InstanceSample.__getitem__`` ('exact' mode) for each item, then collation."""
    rows = []
    for i, t in zip(index, target):
        neg = np.random.choice(negatives[t], k, replace=k > len(negatives[t]))
        rows.append(np.hstack((np.asarray([i]), neg)))
    return default_collate(rows)  # (B, K+1) int64, as the DataLoader hands it over


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_folder", default=None, help="folder holding cifar-100-python/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=200, help="timed batches per pipeline")
    parser.add_argument("--batch_size", type=int, default=64, help="RepDistiller's default")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the PIL pipeline")
    parser.add_argument("--nce_k", type=int, default=16384, help="CRD negatives (RepDistiller's default)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all pipelines; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run as `python scripts/bench_data.py`: the project's packages
    from dataset import CIFAR100_MEAN, CIFAR100_STD, CRDSampler, DeviceLoader, load_cifar100, resolve_data_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_cifar100(resolve_data_folder(args.data_folder))
    images, labels = data.train_images, data.train_labels
    b, n_crd = args.batch_size, max(10, args.batches // 10)  # CRD batches cost more; fewer keep the run short

    ours = DeviceLoader(images, labels, b, device, train=True, seed=0)
    crd = CRDSampler(labels, args.nce_k, seed=0, device=device)
    with_crd = DeviceLoader(images, labels, b, device, train=True, seed=0, crd=crd)
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
    ])  # fmt: skip
    pil_set = PILCIFAR(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.tolist(), transform)
    pil_loader = DataLoader(pil_set, batch_size=b, shuffle=True, num_workers=args.workers)
    streams = {"ours": _forever(ours), "crd": _forever(with_crd), "pil": _forever(pil_loader)}
    gen = torch.Generator(device=device).manual_seed(0)
    anchor = torch.randint(0, len(labels), (b,), generator=torch.Generator().manual_seed(0))
    index, target = anchor.to(device), labels[anchor].to(device)
    negatives = [np.flatnonzero(labels.numpy() != c) for c in range(100)]  # RepDistiller's cls_negative
    np.random.seed(0)
    ref_args = (negatives, anchor.numpy(), labels[anchor].numpy(), args.nce_k)
    cpu = torch.device("cpu")

    # Rounds alternate between the pipelines and the best of each is kept, so that a burst of load from
    # other processes does not land on one pipeline only.
    ips = {name: 0.0 for name in streams}
    sample_s = {"ours": float("inf"), "ref": float("inf"), "floor": float("inf")}
    bk = (len(anchor), args.nce_k)
    for r in range(args.repeats):
        log.info("round %d of %d", r + 1, args.repeats)
        ips["ours"] = max(ips["ours"], images_per_second(streams["ours"], args.batches, device))
        ips["crd"] = max(ips["crd"], images_per_second(streams["crd"], n_crd, device))
        ips["pil"] = max(ips["pil"], images_per_second(streams["pil"], args.batches, cpu))
        ours_s = seconds_per_call(lambda: crd.sample(index, target, gen), 10, device)
        ref_s = seconds_per_call(lambda: repdistiller_crd_batch(*ref_args), 3, cpu)
        # The floor of any exact sampler: drawing B x K int64 indices at all (with replacement, no de-duplication).
        floor_s = seconds_per_call(lambda: torch.randint(50_000, bk, generator=gen, device=device), 10, device)
        sample_s = {
            "ours": min(sample_s["ours"], ours_s), "ref": min(sample_s["ref"], ref_s),
            "floor": min(sample_s["floor"], floor_s),
        }  # fmt: skip
    ours_ips, crd_ips, pil_ips = ips["ours"], ips["crd"], ips["pil"]
    ours_s, ref_s, floor_s = sample_s["ours"], sample_s["ref"], sample_s["floor"]

    where = f"{device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"\nTraining data, batch {b}, images per second, best of {args.repeats} rounds ({where}):\n")
    print("| pipeline | images/s | vs PIL DataLoader |")
    print("|---|---:|---:|")
    print(f"| DeviceLoader (crop, flip, normalise on {device.type}) | {ours_ips:,.0f} | {ours_ips / pil_ips:.1f}x |")
    print(f"| DeviceLoader + CRD indices (nce_k {args.nce_k}) | {crd_ips:,.0f} | {crd_ips / pil_ips:.1f}x |")
    print(f"| PIL transforms in a DataLoader, {args.workers} workers (RepDistiller) | {pil_ips:,.0f} | 1.0x |")
    print(f"\nCRD contrast indices for one batch of {b}, K = {args.nce_k}, 50,000 training images:\n")
    print("| sampler | ms per batch | speed-up |")
    print("|---|---:|---:|")
    print(f"| CRDSampler ({device.type}, whole batch at once) | {ours_s * 1e3:.2f} | {ref_s / ours_s:.1f}x |")
    print(f"| numpy.random.choice per sample + collate (RepDistiller) | {ref_s * 1e3:.2f} | 1.0x |")
    print(
        f"| lower bound: torch.randint of {bk[0]} x {bk[1]} int64 alone ({device.type}) | {floor_s * 1e3:.2f} "
        f"| {ref_s / floor_s:.1f}x |"
    )


if __name__ == "__main__":
    main()
