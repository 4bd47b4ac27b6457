"""CIFAR-100 loading, splits, on-device augmentation and CRD sampling."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from cifar_fixture import TEST_PER_CLASS, TRAIN_PER_CLASS, write_cifar100
from PIL import Image
from shared_paths import DATA, REAL_DATA, needs_real_data

from dataset import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CRDSampler,
    DataError,
    DeviceLoader,
    augment,
    load_cifar100,
    normalize,
    resolve_data_folder,
    split_indices,
)
from dataset import cifar100 as cifar_module

P_MIN = 1e-3  # chi-square tests: a fair sampler fails with probability 0.001 (seeds are fixed, so never here)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def real():
    """The real data, loaded once, with the log records the loading wrote."""
    logger, handler = logging.getLogger("dataset.cifar100"), _Records()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        data = load_cifar100(REAL_DATA, download=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return data, handler.records


def _chi2_pvalue(counts: torch.Tensor, expected: float | torch.Tensor) -> float:
    """P-value of Pearson's chi-square statistic, df = bins - 1 (upper regularised gamma function)."""
    counts = counts.double()
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


def _uniform_pvalue(values: torch.Tensor, bins: int) -> float:
    counts = torch.bincount(values.flatten(), minlength=bins)
    assert counts.numel() == bins, "values outside 0..bins-1"
    return _chi2_pvalue(counts, values.numel() / bins)


def _write_cifar(folder: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> dict:
    """A small folder in CIFAR-100's format; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per)
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": [0] * len(labels)}, f, 2)
        out[split] = (data, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f, 2)
    return out


# ---------------------------------------------------------------- loading the real data


@needs_real_data
def test_real_data_counts_classes_and_statistics(real):
    data, _ = real
    assert data.train_images.shape == (50_000, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (10_000, 3, 32, 32) and data.test_images.dtype == torch.uint8
    assert data.train_labels.dtype == torch.int64 and data.n_data == 50_000
    assert torch.equal(torch.bincount(data.train_labels), torch.full((100,), 500))
    assert torch.equal(torch.bincount(data.test_labels), torch.full((100,), 100))
    assert len(data.classes) == 100 and len(set(data.classes)) == 100
    assert data.classes[0] == "apple" and data.classes[-1] == "worm"  # fine labels are sorted by name
    # Exact integer sums in NumPy (cheap): pixel values and their squares, per channel.
    pixels = data.train_images.numpy().reshape(50_000, 3, 1024)
    total, squares = np.zeros(3, np.uint64), np.zeros(3, np.uint64)
    for start in range(0, 50_000, 5000):
        chunk = pixels[start : start + 5000]
        total += chunk.sum(axis=(0, 2), dtype=np.uint64)
        sq = chunk.astype(np.uint16)
        sq *= sq  # 255**2 fits in uint16
        squares += sq.sum(axis=(0, 2), dtype=np.uint64)
    n = 50_000 * 1024
    mean = torch.from_numpy(total / n / 255)
    std = (torch.from_numpy(squares / n / 255**2) - mean**2).sqrt()
    # Published CIFAR-100 training statistics (per channel, R G B).
    assert torch.allclose(mean, torch.tensor([0.50708, 0.48655, 0.44092], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(std, torch.tensor([0.26733, 0.25644, 0.27615], dtype=torch.float64), atol=1e-3)


@needs_real_data
def test_real_copy_accepted_by_content_with_one_info_line(real):
    data, records = real
    folder = data.root / "cifar-100-python"
    official = {
        name: hashlib.md5((folder / name).read_bytes()).hexdigest() == cifar_module.OFFICIAL_MD5[name]
        for name in ("train", "test")
    }
    lines = [r for r in records if "differ from the official checksums" in r.getMessage()]
    if all(official.values()):
        assert lines == []
    else:  # the offline copy: train and test were rebuilt, meta is official
        assert len(lines) == 1 and lines[0].levelno == logging.INFO
        message = lines[0].getMessage()
        assert all((name in message) == (not ok) for name, ok in official.items())
        assert "meta," not in message
    assert not [r for r in records if r.levelno >= logging.WARNING]  # full-size data: no subset warning


def test_train_file_truncated_is_rejected(tmp_path):
    src = DATA / "cifar-100-python"  # the real copy, else the synthetic one
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(src / "train", "rb") as f:  # the first 5 MB of the real 155 MB, or half of the synthetic 1.5 MB
        (folder / "train").write_bytes(f.read(min(5_000_000, (src / "train").stat().st_size // 2)))
    for name in ("test", "meta"):
        (folder / name).symlink_to(src / name)
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        load_cifar100(tmp_path, download=False)
    assert str(folder / "train") in str(err.value)


# ---------------------------------------------------------------- loading: synthetic folders


def test_synthetic_fixture_has_the_official_layout_and_loads_with_a_logged_note(tmp_path, caplog):
    folder = write_cifar100(tmp_path) / "cifar-100-python"
    raw = {}
    for name in ("train", "test", "meta"):
        with open(folder / name, "rb") as f:
            raw[name] = pickle.load(f, encoding="bytes")  # as the official (Python 2) files read
    keys = {b"batch_label", b"coarse_labels", b"data", b"filenames", b"fine_labels"}
    assert set(raw["train"]) == set(raw["test"]) == keys
    assert set(raw["meta"]) == {b"fine_label_names", b"coarse_label_names"}
    assert len(raw["meta"][b"fine_label_names"]) == 100
    assert raw["train"][b"data"].dtype == np.uint8 and raw["train"][b"data"].shape == (100 * TRAIN_PER_CLASS, 3072)
    with caplog.at_level(logging.INFO, logger="dataset.cifar100"):
        data = load_cifar100(tmp_path, download=False)
    assert torch.equal(data.train_images.reshape(-1, 3072), torch.from_numpy(raw["train"][b"data"]))
    assert torch.equal(data.test_labels, torch.tensor(raw["test"][b"fine_labels"]))
    assert torch.equal(torch.bincount(data.train_labels), torch.full((100,), TRAIN_PER_CLASS))
    assert torch.equal(torch.bincount(data.test_labels), torch.full((100,), TEST_PER_CLASS))
    # Not the official checksums: accepted after the content check, with one INFO line (and the subset warnings).
    (note,) = [r for r in caplog.records if "differ from the official checksums" in r.getMessage()]
    assert note.levelno == logging.INFO and "meta, train, test" in note.getMessage()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all("not comparable with published ones" in w for w in warnings)
    # Learnable: an image is nearer its own class's mean training image than any other (noise 24 on 0..255).
    means = torch.stack([data.train_images[data.train_labels == c].double().mean(0) for c in range(100)])
    nearest = torch.cdist(data.test_images.double().flatten(1), means.flatten(1)).argmin(1)
    assert torch.equal(nearest, data.test_labels)


def test_subset_folder_loads_with_warning_and_info(tmp_path, caplog):
    written = _write_cifar(tmp_path / "cifar-100-python", train_per_class=3, test_per_class=1)
    with caplog.at_level(logging.INFO, logger="dataset.cifar100"):
        data = load_cifar100(tmp_path, download=False)
    data_w, labels_w = written["train"]
    assert torch.equal(data.train_images, torch.from_numpy(data_w).view(300, 3, 32, 32))
    assert torch.equal(data.train_labels, torch.from_numpy(labels_w))
    assert data.test_images.shape == (100, 3, 32, 32) and data.classes[7] == "class7"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("not comparable with published" in r.getMessage() for r in warnings)
    infos = [r for r in caplog.records if "differ from the official checksums" in r.getMessage()]
    assert len(infos) == 1 and "meta, train, test" in infos[0].getMessage()


def test_official_checksums_accepted_silently(tmp_path, caplog, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    _write_cifar(folder, 2, 1)
    monkeypatch.setitem(cifar_module.FULL_SIZE, "train", 200)  # no subset warning for this small folder
    monkeypatch.setitem(cifar_module.FULL_SIZE, "test", 100)
    for name in ("train", "test", "meta"):
        monkeypatch.setitem(cifar_module.OFFICIAL_MD5, name, hashlib.md5((folder / name).read_bytes()).hexdigest())
    with caplog.at_level(logging.DEBUG, logger="dataset.cifar100"):
        data = load_cifar100(folder, download=False)  # the cifar-100-python folder itself works too
    assert caplog.records == [] and data.root == tmp_path and data.n_data == 200


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _text(path: Path) -> None:
    path.write_text("not a pickle\n")


def _labels_out_of_range(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 100]}, f)


def _wrong_width(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 1024), np.uint8), "fine_labels": [0, 1]}, f)


def _wrong_dtype(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.float32), "fine_labels": [0, 1]}, f)


def _label_count(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((3, 3072), np.uint8), "fine_labels": [0, 1]}, f)


def _no_labels(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, f)


def _a_list(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_truncate, "truncated or corrupt"),
        (_garbage, "truncated or corrupt"),
        (_text, "truncated or corrupt"),
        (_labels_out_of_range, "labels outside 0..99"),
        (_wrong_width, "should be uint8"),
        (_wrong_dtype, "should be uint8"),
        (_label_count, "3 images but 2 labels"),
        (_no_labels, "keys 'data' and 'fine_labels'"),
        (_a_list, "not a CIFAR-100 file"),
    ],
)
def test_corrupt_train_file_rejected_naming_it(tmp_path, corrupt, message):
    folder = tmp_path / "cifar-100-python"
    _write_cifar(folder, 2, 1)
    corrupt(folder / "train")
    with pytest.raises(DataError, match=message) as err:
        load_cifar100(tmp_path, download=False)
    assert str(folder / "train") in str(err.value)


def test_corrupt_meta_rejected_naming_it(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _write_cifar(folder, 2, 1)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["a"] * 20}, f)
    with pytest.raises(DataError, match="fine_label_names") as err:
        load_cifar100(tmp_path, download=False)
    assert str(folder / "meta") in str(err.value)


class _Remove:
    """Unpickling this would delete a file: the loader must refuse it before running anything."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.remove, (self.path,)


def test_pickle_with_foreign_code_is_refused_not_run(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _write_cifar(folder, 2, 1)
    marker = tmp_path / "marker"
    marker.write_text("still here")
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": _Remove(str(marker)), "fine_labels": []}, f)
    with pytest.raises(DataError, match="unexpected object") as err:
        load_cifar100(tmp_path, download=False)
    assert str(folder / "test") in str(err.value) and marker.exists()


def _offline(root: Path) -> None:
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_missing_data_with_failing_download_names_folder_and_fix(tmp_path, monkeypatch):
    calls = []

    def offline(root: Path) -> None:
        calls.append(root)
        _offline(root)

    monkeypatch.setattr(cifar_module, "download_official", offline)  # the default downloader, never the network
    with pytest.raises(DataError) as err:
        load_cifar100(tmp_path)
    message = str(err.value)
    assert calls == [tmp_path]
    assert str(tmp_path / "cifar-100-python") in message and "name resolution" in message
    assert "--data_folder" in message and "CIFAR100_ROOT" in message and "\n" not in message
    assert isinstance(err.value.__cause__, urllib.error.URLError)


def test_missing_data_without_download_never_downloads(tmp_path):
    calls = []
    with pytest.raises(DataError, match="downloading is off") as err:
        load_cifar100(tmp_path, download=False, downloader=calls.append)
    assert calls == [] and str(tmp_path) in str(err.value)


def test_download_that_fills_the_folder_is_used(tmp_path):
    def fake(root: Path) -> None:
        _write_cifar(root / "cifar-100-python", 1, 1)

    data = load_cifar100(tmp_path / "new", downloader=fake)
    assert data.n_data == 100 and data.root == tmp_path / "new"


def test_download_that_leaves_files_missing(tmp_path):
    with pytest.raises(DataError, match="even after downloading"):
        load_cifar100(tmp_path, downloader=lambda root: None)


def test_resolve_data_folder_order(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR100_ROOT", str(tmp_path))
    assert resolve_data_folder("/x/y") == Path("/x/y")
    assert resolve_data_folder(None) == tmp_path
    monkeypatch.delenv("CIFAR100_ROOT")
    assert resolve_data_folder(None) == Path("./data")


# ---------------------------------------------------------------- class-balanced splits

# CIFAR-100's training labels in shape: 100 classes of 500, in a fixed shuffled order.
CIFAR_LABELS = torch.arange(100).repeat_interleave(500)[
    torch.randperm(50_000, generator=torch.Generator().manual_seed(3))
]


def test_split_is_class_balanced_disjoint_and_seeded():
    train, val = split_indices(CIFAR_LABELS, train_size=10_000, val_size=5_000, seed=1)
    assert torch.equal(torch.bincount(CIFAR_LABELS[train], minlength=100), torch.full((100,), 100))
    assert torch.equal(torch.bincount(CIFAR_LABELS[val], minlength=100), torch.full((100,), 50))
    assert len(np.intersect1d(train.numpy(), val.numpy())) == 0
    assert torch.all(train.diff() > 0) and torch.all(val.diff() > 0)  # sorted, no repeats
    again = split_indices(CIFAR_LABELS, train_size=10_000, val_size=5_000, seed=1)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    other_train, other_val = split_indices(CIFAR_LABELS, train_size=10_000, val_size=5_000, seed=2)
    # Independent seeds: an image is in both training subsets with probability 0.2 * 0.2 (2,000 expected, sd
    # about 40) and in both validation sets with probability 0.1 * 0.1 (500 expected, sd about 22).
    assert 1_700 < len(np.intersect1d(train.numpy(), other_train.numpy())) < 2_300
    assert 400 < len(np.intersect1d(val.numpy(), other_val.numpy())) < 600


def test_split_rest_is_training_and_default_is_everything():
    train, val = split_indices(CIFAR_LABELS, val_size=5_000, seed=0)
    assert len(train) == 45_000 and len(val) == 5_000
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(50_000))
    train, val = split_indices(CIFAR_LABELS)
    assert torch.equal(train, torch.arange(50_000)) and len(val) == 0


@pytest.mark.parametrize(
    ("train_size", "val_size", "flag"),
    [
        (None, 150, "--val_size"),  # not a multiple of 100 classes
        (None, 50_000, "--val_size"),  # nothing left to train on
        (45_100, 5_000, "--train_size"),  # 451 per class, 450 left
        (250, 0, "--train_size"),
        (0, 0, "--train_size"),
    ],
)
def test_split_errors_name_the_flag(train_size, val_size, flag):
    with pytest.raises(DataError, match=flag):
        split_indices(CIFAR_LABELS, train_size=train_size, val_size=val_size)


def test_split_with_unequal_class_sizes():
    labels = torch.tensor([0] * 3 + [1] * 6)
    train, val = split_indices(labels, train_size=4, val_size=2, seed=0)
    assert torch.equal(torch.bincount(labels[val]), torch.tensor([1, 1]))
    assert torch.equal(torch.bincount(labels[train]), torch.tensor([2, 2]))
    with pytest.raises(DataError, match="--train_size"):
        split_indices(labels, train_size=6, val_size=2)  # class 0 has 2 left


# ---------------------------------------------------------------- augmentation


def _reference(image: torch.Tensor, dx: int, dy: int, flip: bool) -> torch.Tensor:
    """One image the straightforward way: zero-pad by 4, slice the crop, mirror, /255, normalise."""
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = image
    crop = padded[:, dy : dy + 32, dx : dx + 32]
    if flip:
        crop = crop.flip(-1)
    mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(3, 1, 1)
    return (crop.float() / 255 - mean) / std


def _torchvision_reference(image: torch.Tensor, dx: int, dy: int, flip: bool) -> torch.Tensor:
    """One image through RepDistiller's PIL transforms, with the crop and flip draws fixed."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    pil = TF.crop(TF.pad(pil, 4), dy, dx, 32, 32)  # RandomCrop(32, padding=4): top dy, left dx
    if flip:
        pil = TF.hflip(pil)
    return TF.normalize(TF.to_tensor(pil), CIFAR100_MEAN, CIFAR100_STD)


def _random_batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    dx = torch.randint(0, 9, (n,), generator=g)
    dy = torch.randint(0, 9, (n,), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g).bool()
    dx[:4], dy[:4], flip[:4] = torch.tensor([0, 8, 0, 8]), torch.tensor([0, 0, 8, 8]), torch.tensor([1, 0, 1, 0])
    return images, dx, dy, flip


def test_augment_equals_per_image_references_exactly():
    images, dx, dy, flip = _random_batch(40)
    out = augment(images, dx, dy, flip)
    assert out.dtype == torch.float32 and out.shape == (40, 3, 32, 32)
    for i in range(40):
        args = (images[i], int(dx[i]), int(dy[i]), bool(flip[i]))
        assert torch.equal(out[i], _reference(*args)), i
        assert torch.equal(out[i], _torchvision_reference(*args)), i
    # The corners of a crop at offset (0, 0) are padding: zero pixels, normalised.
    assert torch.equal(out[0, :, 0, 0], (0 - torch.tensor(CIFAR100_MEAN)) / torch.tensor(CIFAR100_STD))


def test_augment_channels_last_same_values():
    images, dx, dy, flip = _random_batch(8)
    out = augment(images, dx, dy, flip, memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, augment(images, dx, dy, flip))


def _plan_loader(n: int, seed: int = 0) -> DeviceLoader:
    # The draws do not depend on the pixels: 1x1 images keep this cheap.
    return DeviceLoader(torch.zeros(n, 1, 1, 1, dtype=torch.uint8), torch.zeros(n), 64, "cpu", True, seed)


def test_crop_and_flip_draws_are_uniform_and_independent():
    plan = _plan_loader(90_000, seed=5).plan(0)
    assert torch.equal(torch.sort(plan.perm).values, torch.arange(90_000))
    assert _uniform_pvalue(plan.dx, 9) > P_MIN
    assert _uniform_pvalue(plan.dy, 9) > P_MIN
    assert _uniform_pvalue(plan.flip.long(), 2) > P_MIN
    joint = (plan.dx * 9 + plan.dy) * 2 + plan.flip.long()  # 162 cells: uniform only if independent
    assert _uniform_pvalue(joint, 162) > P_MIN


def test_chi_square_check_catches_biased_draws():
    g = torch.Generator().manual_seed(0)
    fair = torch.randint(0, 9, (90_000,), generator=g)
    assert _uniform_pvalue(fair, 9) > P_MIN
    biased = fair.clone()
    head = biased[:10_000]
    head[head == 8] = 0  # ~1,100 of offset 8's 10,000 draws moved to offset 0: an 11% bias on two offsets
    assert _uniform_pvalue(biased, 9) < P_MIN
    assert _uniform_pvalue(torch.randint(0, 8, (90_000,), generator=g), 9) < P_MIN  # offsets 0..7 only
    flips = torch.rand(90_000, generator=g) < 0.51  # p = 0.51 instead of 0.5
    assert _uniform_pvalue(flips.long(), 2) < P_MIN
    dx, dy = fair, torch.randint(0, 9, (90_000,), generator=g)
    fair_flip = torch.randint(0, 2, (90_000,), generator=g)
    # One flip in ten follows the offset (mirror when dx < 4): each marginal is nearly fair, the joint is not.
    flip = torch.where(torch.rand(90_000, generator=g) < 0.1, (dx < 4).long(), fair_flip)
    assert _uniform_pvalue((dx * 9 + dy) * 2 + fair_flip, 162) > P_MIN
    assert _uniform_pvalue((dx * 9 + dy) * 2 + flip, 162) < P_MIN


def test_draws_depend_on_seed_and_epoch_only():
    a, b = _plan_loader(1000, seed=1), _plan_loader(1000, seed=1)
    for x, y in zip(a.plan(3), b.plan(3)):
        assert torch.equal(x, y)
    assert not torch.equal(a.plan(3).perm, a.plan(4).perm)
    assert not torch.equal(a.plan(3).dx, _plan_loader(1000, seed=2).plan(3).dx)


# ---------------------------------------------------------------- the loader


def _images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 10


def test_train_loader_serves_every_index_once_and_augments_by_the_plan():
    images, labels = _images(203)
    loader = DeviceLoader(images, labels, 32, "cpu", train=True, seed=0)
    assert len(loader) == 7
    batches = list(loader)
    assert [len(b.index) for b in batches] == [32] * 6 + [11]  # the last partial batch is kept
    order = torch.cat([b.index for b in batches])
    assert torch.equal(torch.sort(order).values, torch.arange(203))
    plan = loader.plan(0)
    assert torch.equal(order, plan.perm)
    for i, batch in enumerate(batches):
        s = slice(32 * i, 32 * (i + 1))
        assert torch.equal(batch.target, labels[batch.index]) and batch.contrast_idx is None
        assert torch.equal(batch.input, augment(images[batch.index], plan.dx[s], plan.dy[s], plan.flip[s]))
    second = torch.cat([b.index for b in loader])
    assert not torch.equal(second, order) and torch.equal(torch.sort(second).values, torch.arange(203))


def test_train_loader_drop_last():
    images, labels = _images(203)
    loader = DeviceLoader(images, labels, 32, "cpu", train=True, seed=0, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 6 and all(len(b.index) == 32 for b in batches)
    order = torch.cat([b.index for b in batches])
    assert len(torch.unique(order)) == 192


def test_indices_map_to_the_full_training_set():
    images, labels = _images(50)
    indices = torch.arange(50) * 7 + 3
    loader = DeviceLoader(images, labels, 16, "cpu", train=False, indices=indices)
    assert torch.equal(torch.cat([b.index for b in loader]), indices)


def _same_batches(xs, ys) -> bool:
    return len(xs) == len(ys) and all(
        all((a is None and b is None) or torch.equal(a, b) for a, b in zip(x, y)) for x, y in zip(xs, ys)
    )


def test_an_epoch_is_a_function_of_seed_and_epoch():
    """What a resumed run relies on: a new loader with the same seed serves any epoch, from any batch, as the
    first one did; plain iteration serves the next epoch."""
    images, labels = _images(150)
    crd = CRDSampler(labels, 20, seed=0)
    first = DeviceLoader(images, labels, 32, "cpu", train=True, seed=4, crd=crd)
    list(first)  # epoch 0
    expected = list(first)  # epoch 1
    resumed = DeviceLoader(images, labels, 32, "cpu", train=True, seed=4, crd=crd)
    got = list(resumed.epoch(1))
    assert _same_batches(got, expected) and got[0].contrast_idx.shape == (32, 21)
    assert _same_batches(list(resumed.epoch(1, start_batch=3)), expected[3:])  # mid-epoch resume
    fresh = DeviceLoader(images, labels, 32, "cpu", train=True, seed=4, crd=crd)
    assert not _same_batches(list(fresh), expected)  # epoch 0 differs from epoch 1
    other_seed = DeviceLoader(images, labels, 32, "cpu", train=True, seed=5, crd=crd)
    assert not _same_batches(list(other_seed.epoch(1)), expected)


def test_eval_loader_is_ordered_and_only_normalised():
    images, labels = _images(70)
    loader = DeviceLoader(images, labels, 32, "cpu", train=False, memory_format=torch.channels_last)
    batches = list(loader)
    assert [len(b.index) for b in batches] == [32, 32, 6]
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(70))
    out = torch.cat([b.input for b in batches])
    assert batches[0].input.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(3, 1, 1)
    for i in (0, 33, 69):
        assert torch.equal(out[i], (images[i].float() / 255 - mean) / std)
    assert torch.equal(out, normalize(images))
    assert _same_batches(list(loader), batches)


def test_loader_rejects_bad_arguments():
    images, labels = _images(20)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images.float(), labels, 4, "cpu", train=True)
    with pytest.raises(ValueError, match="batch size"):
        DeviceLoader(images, labels, 0, "cpu", train=True)
    with pytest.raises(ValueError, match="other images"):
        DeviceLoader(images, labels, 4, "cpu", train=True, crd=CRDSampler(labels, 5, indices=torch.arange(20) + 1))
    with pytest.raises(ValueError, match="training loader"):
        DeviceLoader(images, labels, 4, "cpu", train=False, crd=CRDSampler(labels, 5))


# ---------------------------------------------------------------- CRD sampling


def _draw(sampler: CRDSampler, index: torch.Tensor, target: torch.Tensor, rounds: int) -> torch.Tensor:
    gen = torch.Generator()
    rows = []
    for r in range(rounds):
        gen.manual_seed(r)
        rows.append(sampler.sample(index, target, gen))
    return torch.cat(rows)  # (rounds * B, K+1)


LABELS_10x30 = torch.arange(10).repeat(30)  # 300 images, class = position % 10


def test_crd_exact_negatives_distinct_other_class_and_uniform():
    sampler = CRDSampler(LABELS_10x30, nce_k=50, mode="exact")
    index = torch.arange(0, 300, 10)[:25].repeat(8)  # (200,) anchors, all of class 0
    out = _draw(sampler, index, LABELS_10x30[index], rounds=10)  # (2000, 51)
    assert out.shape == (2000, 51) and out.dtype == torch.int64
    assert torch.equal(out[:, 0], index.repeat(10))  # exact: the positive is the anchor
    neg = out[:, 1:]
    assert not torch.any(LABELS_10x30[neg] == 0)
    assert torch.all(torch.sort(neg, dim=1).values.diff(dim=1) > 0)  # distinct within each row
    counts = torch.bincount(neg.flatten(), minlength=300)[LABELS_10x30 != 0]  # the 270 allowed images
    assert counts.sum() == 100_000 and _chi2_pvalue(counts, 100_000 / 270) > P_MIN


def test_crd_relax_positives_share_the_class_uniformly():
    sampler = CRDSampler(LABELS_10x30, nce_k=5, mode="relax")
    index = torch.full((200,), 20)  # one anchor of class 0, drawn 2000 times
    out = _draw(sampler, index, LABELS_10x30[index], rounds=10)
    pos = out[:, 0]
    assert torch.all(LABELS_10x30[pos] == 0)
    counts = torch.bincount(pos, minlength=300)[LABELS_10x30 == 0]  # all 30 images of class 0, anchor included
    assert _chi2_pvalue(counts, 2000 / 30) > P_MIN


def test_crd_full_cifar_geometry():
    sampler = CRDSampler(CIFAR_LABELS, nce_k=16384)
    index = torch.randint(0, 50_000, (64,), generator=torch.Generator().manual_seed(0))
    out = sampler.sample(index, CIFAR_LABELS[index], torch.Generator().manual_seed(1))
    assert out.shape == (64, 16385)
    neg = out[:, 1:]
    assert not torch.any(CIFAR_LABELS[neg] == CIFAR_LABELS[index][:, None])
    assert torch.all(torch.sort(neg, dim=1).values.diff(dim=1) > 0)
    assert int(neg.min()) >= 0 and int(neg.max()) < 50_000


def test_crd_replacement_only_when_k_exceeds_the_negatives(caplog):
    index = torch.zeros(40, dtype=torch.int64)  # class 0: 270 negatives
    with caplog.at_level(logging.WARNING, logger="dataset.crd"):
        exact_fit = CRDSampler(LABELS_10x30, nce_k=270)
    assert caplog.records == []
    out = exact_fit.sample(index, LABELS_10x30[index], torch.Generator().manual_seed(0))
    allowed = torch.nonzero(LABELS_10x30 != 0).squeeze(1)
    assert all(torch.equal(torch.sort(row).values, allowed) for row in out[:, 1:])  # each a permutation
    with caplog.at_level(logging.WARNING, logger="dataset.crd"):
        too_many = CRDSampler(LABELS_10x30, nce_k=400)
    assert len(caplog.records) == 1 and "with replacement" in caplog.records[0].getMessage()
    out = too_many.sample(index, LABELS_10x30[index], torch.Generator().manual_seed(0))
    assert out.shape == (40, 401) and not torch.any(LABELS_10x30[out[:, 1:]] == 0)
    assert all(len(torch.unique(row)) < 400 for row in out[:, 1:])  # 400 draws from 270 must repeat


RAGGED = torch.tensor([0] * 5 + [1] * 10 + [2] * 20 + [3] * 40)  # negatives: 70, 65, 55, 35


def test_crd_unequal_class_sizes():
    sampler = CRDSampler(RAGGED, nce_k=35)
    index = torch.tensor([74] * 100 + [0] * 100)  # anchors of class 3 (exactly 35 negatives) and class 0 (70)
    out = _draw(sampler, index, RAGGED[index], rounds=10).view(10, 200, 36)
    for row in out[:, :100, 1:].reshape(-1, 35):
        assert torch.equal(torch.sort(row).values, torch.arange(35))  # every negative of class 3, once
    neg0 = out[:, 100:, 1:].reshape(-1, 35)  # (1000, 35)
    assert not torch.any(RAGGED[neg0] == 0)
    assert torch.all(torch.sort(neg0, dim=1).values.diff(dim=1) > 0)
    counts = torch.bincount(neg0.flatten(), minlength=75)[5:]  # the 70 images of classes 1..3
    assert _chi2_pvalue(counts, 1000 * 35 / 70) > P_MIN
    mixed = CRDSampler(RAGGED, nce_k=50)  # class 3 anchors draw with replacement, class 0 anchors do not
    out = _draw(mixed, index, RAGGED[index], rounds=2).view(2, 200, 51)
    assert torch.all(out[:, :100, 1:] < 35)
    assert any(len(torch.unique(row)) < 50 for row in out[:, :100, 1:].reshape(-1, 50))
    assert torch.all(torch.sort(out[:, 100:, 1:], dim=-1).values.diff(dim=-1) > 0)


def test_crd_percent_keeps_a_seeded_fraction():
    a = CRDSampler(LABELS_10x30, nce_k=20, percent=0.5, seed=1)
    b = CRDSampler(LABELS_10x30, nce_k=20, percent=0.5, seed=1)
    c = CRDSampler(LABELS_10x30, nce_k=20, percent=0.5, seed=2)
    kept = a.negatives_of(0)
    assert len(kept) == 135 and len(torch.unique(kept)) == 135 and not torch.any(LABELS_10x30[kept] == 0)
    assert torch.equal(kept, b.negatives_of(0)) and not torch.equal(kept, c.negatives_of(0))
    index = torch.zeros(50, dtype=torch.int64)
    neg = _draw(a, index, LABELS_10x30[index], rounds=4)[:, 1:]
    assert torch.all(torch.isin(neg, kept))


def test_crd_uses_the_loader_index_space():
    labels = LABELS_10x30[:100]
    indices = torch.arange(100) * 3 + 1000  # positions of a subset in the full training set
    sampler = CRDSampler(labels, nce_k=30, mode="exact", indices=indices)
    images = torch.zeros(100, 3, 32, 32, dtype=torch.uint8)
    loader = DeviceLoader(images, labels, 25, "cpu", train=True, seed=0, crd=sampler, indices=indices)
    for batch in loader:
        assert torch.equal(batch.contrast_idx[:, 0], batch.index)
        assert torch.all(torch.isin(batch.contrast_idx, indices))
        label_of = dict(zip(indices.tolist(), labels.tolist()))
        neg_labels = torch.tensor([[label_of[i] for i in row] for row in batch.contrast_idx[:, 1:].tolist()])
        assert not torch.any(neg_labels == batch.target[:, None])


@pytest.mark.parametrize(("kwargs", "flag"), [({"nce_k": 0}, "--nce_k"), ({"nce_k": 5, "mode": "loose"}, "--mode")])
def test_crd_rejects_bad_flags(kwargs, flag):
    with pytest.raises(DataError, match=flag):
        CRDSampler(LABELS_10x30, **kwargs)
