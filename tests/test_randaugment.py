"""MLKD's strong augmentation on tensors (dataset/randaugment.py) against a per-image Pillow reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from shared_paths import DATA

from dataset import load_cifar100
from dataset.randaugment import CUTOUT_FILL, OP_INDEX, OPS, StrongDraws, apply_strong, draw_strong

P_MIN = 1e-3  # chi-square tests: a fair sampler fails with probability 0.001 (seeds are fixed, so never here)
N_IMAGES = 256  # training images per test: enough for every op to meet varied content and values
PHOTOMETRIC = ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize", "Sharpness",
               "Solarize")  # fmt: skip
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(N_IMAGES, 3, 32, 32) uint8: CIFAR-100 training images (the synthetic ones of cifar_fixture.py without
    ../shared), randomly cropped (zero padding 4) and flipped
    as the weak pipeline leaves them, so that black borders (extreme histograms) occur too."""
    data = load_cifar100(DATA, download=False).train_images[:N_IMAGES]
    g = torch.Generator().manual_seed(0)
    padded = torch.nn.functional.pad(data, (4, 4, 4, 4))
    dx, dy = torch.randint(9, (2, N_IMAGES), generator=g)
    flip = torch.rand(N_IMAGES, generator=g) < 0.5
    crops = [padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(N_IMAGES)]
    return torch.stack([c.flip(2) if f else c for c, f in zip(crops, flip)])


# ------------------------------------------------------------------------------------------ Pillow reference


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def _pil_op(img: Image.Image, name: str, v: float) -> Image.Image:
    """One op with value v, as MLKD's augment_list() applies it to a PIL RGB image."""
    w, h = img.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Brightness":
        return ImageEnhance.Brightness(img).enhance(v)
    if name == "Color":
        return ImageEnhance.Color(img).enhance(v)
    if name == "Contrast":
        return ImageEnhance.Contrast(img).enhance(v)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Identity":
        return img
    if name == "Posterize":
        return ImageOps.posterize(img, max(1, int(v)))
    if name == "Rotate":
        return img.rotate(v)
    if name == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(v)
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0))
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0))
    if name == "Solarize":
        return ImageOps.solarize(img, v)
    if name == "TranslateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, v * w, 0, 1, 0))
    if name == "TranslateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * h))
    raise ValueError(name)


def _pil_cutout(img: Image.Image, c: float, cx: float, cy: float) -> Image.Image:
    """The official Cutout(img, c) with the centre (cx, cy) that CutoutAbs would have drawn."""
    if c <= 0:
        return img
    w, h = img.size
    side = c * w
    x0 = int(max(0, cx - side / 2.0))
    y0 = int(max(0, cy - side / 2.0))
    x1 = min(w, x0 + side)
    y1 = min(h, y0 + side)
    img = img.copy()
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), CUTOUT_FILL)
    return img


def _pil_strong(images: torch.Tensor, draws: StrongDraws) -> torch.Tensor:
    """The reference: every image through PIL, one at a time, with the same draws. (B, 3, H, W) uint8."""
    out = []
    for i, image in enumerate(images):
        img = _to_pil(image)
        for k, v in zip(draws.op[i].tolist(), draws.value[i].tolist()):
            img = _pil_op(img, OPS[k][0], v)
        img = _pil_cutout(img, float(draws.cutout[i]), float(draws.cutout_x[i]), float(draws.cutout_y[i]))
        out.append(_from_pil(img))
    return torch.stack(out)


def _single_op(name: str, batch: int, seed: int) -> StrongDraws:
    """Draws applying op ``name`` alone to every image, with values spread over [min, max) (both ends included
    up to one ulp) and no Cutout."""
    _, lo, hi = OPS[OP_INDEX[name]]
    u = torch.rand(batch, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0 - 2.0**-53  # the range's ends
    value = lo + (hi - lo) * u
    zero = torch.zeros(batch, dtype=torch.float64)
    return StrongDraws(torch.full((batch, 1), OP_INDEX[name]), value, zero, zero, zero)


def _chi2_pvalue(counts: torch.Tensor, expected: float | torch.Tensor) -> float:
    """Upper tail of Pearson's chi-square statistic with bins - 1 degrees of freedom."""
    counts = counts.double()
    stat = ((counts - expected) ** 2 / expected).sum()
    half_df = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(half_df, stat / 2))


def _synthetic() -> torch.Tensor:
    """(6, 3, 32, 32) uint8 images that reach the corner cases of the histogram ops: uniform noise, a single level,
    two levels, one rare level (Equalize's step 0), and 513 of 1024 pixels at 255 in every channel, where
    Equalize's table reaches 256 and Image.point clips it to 255."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(256, (3, 32, 32), generator=g, dtype=torch.uint8)
    constant = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    two = torch.where(torch.rand(3, 32, 32, generator=g) < 0.5, 0, 255).to(torch.uint8)
    rare = torch.where(torch.rand(3, 32, 32, generator=g) < 0.002, 200, 3).to(torch.uint8)
    bright = torch.randint(255, (3, 32 * 32), generator=g, dtype=torch.uint8)
    bright[:, :513] = 255
    black = torch.zeros(3, 32, 32, dtype=torch.uint8)
    return torch.stack([noise, constant, two, rare, bright.view(3, 32, 32), black])


# ------------------------------------------------------------------------------------------- single ops


@pytest.mark.parametrize("name", PHOTOMETRIC)
def test_photometric_op_matches_pillow(images, name):
    draws = _single_op(name, len(images), seed=OP_INDEX[name])
    assert torch.equal(apply_strong(images, draws), _pil_strong(images, draws))


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_op_matches_pillow(images, name):
    # Pillow's fixed-point (Rotate, ShearX, ShearY) and scaling (TranslateX, TranslateY) paths are emulated in
    # integer and float64 arithmetic: measured equal on all pixels (fraction 1.0), here and on a non-square crop.
    draws = _single_op(name, len(images), seed=100 + OP_INDEX[name])
    assert torch.equal(apply_strong(images, draws), _pil_strong(images, draws))
    wide = images[:64, :, 4:28, :].contiguous()  # (64, 3, 24, 32): centre and translation use H != W
    draws = _single_op(name, len(wide), seed=200 + OP_INDEX[name])
    assert torch.equal(apply_strong(wide, draws), _pil_strong(wide, draws))


@pytest.mark.parametrize("name", [name for name, _, _ in OPS])
def test_op_matches_pillow_on_corner_cases(name):
    images = _synthetic()
    draws = _single_op(name, len(images), seed=300 + OP_INDEX[name])
    assert torch.equal(apply_strong(images, draws), _pil_strong(images, draws))


def test_cutout_matches_pillow(images):
    n = len(images)
    g = torch.Generator().manual_seed(5)
    cutout = 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    cx = 32 * torch.rand(n, generator=g, dtype=torch.float64)
    cy = 32 * torch.rand(n, generator=g, dtype=torch.float64)
    # Corners: no Cutout, the smallest and largest sides, centres on the edges and whole or half pixels.
    cutout[:8] = torch.tensor([0.0, 1e-9, 0.5 - 1e-12, 0.5 - 1e-12, 0.25, 0.25, 1 / 32, 0.3], dtype=torch.float64)
    cx[:8] = torch.tensor([5.0, 0.0, 0.0, 32.0, 31.999, 16.0, 3.5, 1.0], dtype=torch.float64)
    cy[:8] = torch.tensor([5.0, 32.0, 32.0, 0.0, 0.0, 16.5, 7.0, 31.0], dtype=torch.float64)
    draws = StrongDraws(torch.full((n, 1), OP_INDEX["Identity"]), torch.zeros(n, 1, dtype=torch.float64),
                        cutout, cx, cy)  # fmt: skip
    out = apply_strong(images, draws)
    assert torch.equal(out, _pil_strong(images, draws))
    assert torch.equal(out[0], images[0])  # c = 0: no Cutout
    filled = (out == torch.tensor(CUTOUT_FILL, dtype=torch.uint8).view(3, 1, 1)).all(1)  # (B, H, W)
    assert filled[1].sum() == 1  # a side of 1e-9 pixels still fills one pixel (inclusive corners)


# ------------------------------------------------------------------------------------------- composition


def test_two_ops_and_cutout_match_pillow(images):
    draws = draw_strong(len(images), torch.Generator().manual_seed(7))
    assert draws.op.shape == (len(images), 2)
    assert set(draws.op.flatten().tolist()) == set(range(len(OPS)))  # every op met, in either slot
    assert torch.equal(apply_strong(images, draws), _pil_strong(images, draws))


def test_composition_on_non_square_images(images):
    wide = images[:96, :, 2:26, :].contiguous()  # (96, 3, 24, 32)
    draws = draw_strong(len(wide), torch.Generator().manual_seed(8), n_ops=3, height=24, width=32)
    assert torch.equal(apply_strong(wide, draws), _pil_strong(wide, draws))


# ------------------------------------------------------------------------------------------------- draws


def test_draw_strong_distribution():
    n, n_ops, height, width = 20_000, 2, 24, 40
    draws = draw_strong(n, torch.Generator().manual_seed(11), n_ops=n_ops, height=height, width=width)
    assert draws.op.shape == draws.value.shape == (n, n_ops)
    assert draws.op.dtype == torch.int64 and draws.value.dtype == torch.float64
    assert all(t.shape == (n,) and t.dtype == torch.float64 for t in draws[2:])
    # Ops uniform over the 14, independently in each slot (with replacement: equal pairs are as likely as any).
    counts = torch.bincount(draws.op.flatten(), minlength=len(OPS))
    assert counts.numel() == len(OPS) and _chi2_pvalue(counts, n * n_ops / len(OPS)) > P_MIN
    pairs = torch.bincount(draws.op[:, 0] * len(OPS) + draws.op[:, 1], minlength=len(OPS) ** 2)
    assert _chi2_pvalue(pairs, n / len(OPS) ** 2) > P_MIN
    # Values in [min, max) of their op, uniform there.
    lo = torch.tensor([lo for _, lo, _ in OPS], dtype=torch.float64)[draws.op]
    hi = torch.tensor([hi for _, _, hi in OPS], dtype=torch.float64)[draws.op]
    assert ((draws.value >= lo) & (draws.value < hi)).all()
    u = (draws.value - lo) / (hi - lo)
    assert _chi2_pvalue(torch.histc(u, bins=20, min=0, max=1), u.numel() / 20) > P_MIN
    # Cutout: c uniform in [0, 0.5); centres uniform in (1, width] and (1, height], NumPy's uniform(w).
    assert ((draws.cutout >= 0) & (draws.cutout < 0.5)).all()
    assert _chi2_pvalue(torch.histc(draws.cutout, bins=20, min=0, max=0.5), n / 20) > P_MIN
    for centre, size in ((draws.cutout_x, width), (draws.cutout_y, height)):
        assert ((centre > 1) & (centre <= size)).all()
        assert _chi2_pvalue(torch.histc(centre, bins=20, min=1, max=size), n / 20) > P_MIN


def test_draw_strong_is_reproducible():
    first = draw_strong(64, torch.Generator().manual_seed(3))
    again = draw_strong(64, torch.Generator().manual_seed(3))
    other = draw_strong(64, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert all(t.device.type == "cpu" for t in first)


# ---------------------------------------------------------------------------------------------- contract


def test_apply_strong_contract(images):
    batch = images[:32].clone()
    draws = draw_strong(len(batch), torch.Generator().manual_seed(9))
    out = apply_strong(batch, draws)
    assert torch.equal(batch, images[:32])  # the input is left alone
    assert out.dtype == torch.uint8 and out.shape == batch.shape and out.device == batch.device
    assert not torch.equal(out, batch)
    empty = apply_strong(batch[:0], draw_strong(0, torch.Generator().manual_seed(9)))
    assert empty.shape == (0, 3, 32, 32) and empty.dtype == torch.uint8
    with pytest.raises(ValueError, match="uint8"):
        apply_strong(batch.float(), draws)
    with pytest.raises(ValueError, match="uint8"):
        apply_strong(batch[:, :1], draws)
    with pytest.raises(ValueError, match="draws"):
        apply_strong(batch[:16], draws)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(images):
    draws = draw_strong(len(images), torch.Generator().manual_seed(12))
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # as --deterministic runs it: every kernel used must be allowed
    try:
        out = apply_strong(images.cuda(), draws)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), apply_strong(images, draws))
