"""MLKD's "strong" augmentation (FixMatch-style RandAugment(2, 10), then Cutout) on uint8 batches on the device.

MLKD (Jin et al., Multi-Level Logit Distillation, CVPR 2023) trains on a weak view (crop + flip) and a strong view:
crop + flip, then ``n = 2`` operations drawn uniformly *with replacement* from the 14 of :data:`OPS`, each with a
value ``v = min + (max - min) * u``, ``u ~ U[0, 1)``, applied in order to a PIL RGB image, then Cutout of side
``c * width`` with ``c = 0.5 * u'``, filled with :data:`CUTOUT_FILL`. Here the same transform runs on a whole
batch (B, 3, H, W) uint8 at once, on the CPU or a GPU, with no per-image Python loop.

As with :func:`dataset.loader.augment`, drawing and applying are split: :func:`draw_strong` makes every random
draw of a batch on the CPU from a seeded generator, :func:`apply_strong` applies them on the images' device, so a
seed gives the same images on any device.

Fidelity to Pillow (the tests compare with Pillow 13 on real CIFAR-100 images; every op is emulated in Pillow's own
integer and float32/float64 arithmetic, not just approximated):

* AutoContrast, Equalize, Posterize, Solarize: per-image, per-channel lookup tables built exactly as ``ImageOps``
  builds them (AutoContrast's float64 ``int(i * scale + offset)``, Equalize's integer ``step``; values the table
  puts above 255 are clipped, as ``Image.point`` does). Bitwise equal.
* Brightness, Color, Contrast, Sharpness: ``Image.blend(degenerate, image, v)``, which computes
  ``in1 + alpha * (in2 - in1)`` in float32 and truncates. Color's degenerate is the ITU-R 601 grey
  ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``; Contrast's the mean of that grey image rounded half up;
  Sharpness's the 3x3 SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1, / 13), summed in float32 in Pillow's order with
  +0.5 and truncated, the one-pixel border copied from the input. Bitwise equal.
* Rotate, ShearX, ShearY: Pillow's nearest-neighbour affine path maps output pixel (x, y) to the source pixel
  ``((A2 + x A0 + y A1) >> 16, (A5 + x A3 + y A4) >> 16)``, the matrix in 16.16 fixed point with the half-pixel
  offsets folded into A2, A5; out-of-image pixels are 0. Emulated in int64, bitwise equal. Rotate's matrix comes
  from float64 ``cos``/``sin`` rounded to 15 decimals, as in ``Image.rotate`` (around (W/2, H/2)); the device's
  ``cos``/``sin``, and ``torch.round(x, 15)`` for Python's decimal ``round``, may differ from CPython's in the last
  bit, which changes a fixed-point coefficient only when it lies within ~1e-10 of a rounding boundary.
* TranslateX, TranslateY: Pillow's scaling path, ``x_in = floor(t + 0.5 + x)`` with ``t = v * W`` (``v * H``),
  evaluated directly where Pillow adds 1.0 pixel by pixel (same result unless ``t + 0.5`` lies within ~1e-14 of an
  integer). Bitwise equal.
* Cutout: ``ImageDraw.rectangle((x0, y0, x1, y1))`` truncates the float corners to int and fills *inclusive* rows
  ``y0..int(y1)`` and columns ``x0..int(x1)``, clipped to the image. Bitwise equal.

Cutout's centre: the official code (FixMatch's ``CutoutAbs``, copied by MLKD) draws ``x0 = np.random.uniform(w)``,
which is NumPy's ``uniform(low=w, high=1.0)``: a centre in (1, w], not [0, w). :func:`draw_strong` reproduces that
distribution; :func:`apply_strong` takes whatever centres it is given.

Exactness rests on eager execution: every multiply and add is its own kernel, so none is fused into an FMA, and
divisions are tensor by tensor (torch turns a division by a scalar into a multiplication by its reciprocal). Do not
``torch.compile`` :func:`apply_strong` if bitwise agreement with Pillow matters. It needs float64 (CPU, CUDA).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

# (name, min, max) of each operation, in the order (and with the ranges) of MLKD's augment_list(); an op's value is
# v = min + (max - min) * u, u ~ U[0, 1).
OPS: tuple[tuple[str, float, float], ...] = (
    ("AutoContrast", 0.0, 1.0),
    ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95),
    ("Equalize", 0.0, 1.0),
    ("Identity", 0.0, 1.0),
    ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0),
    ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0),
    ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)
OP_INDEX = {name: k for k, (name, _, _) in enumerate(OPS)}
N_OPS = 2  # RandAugment(2, 10): two ops per image (the magnitude 10 is unused by MLKD's version)
CUTOUT_MAX = 0.5  # Cutout's side is c * width, c ~ U[0, 0.5)
CUTOUT_FILL = (125, 123, 114)

# SMOOTH's weights as Pillow holds them: float32 kernel entries divided by the float32 divisor 13. Python floats
# holding float32 values, so multiplying a float32 tensor by them is exact and needs no device tensor.
_SMOOTH_EDGE = float(np.float32(1.0) / np.float32(13.0))
_SMOOTH_CENTRE = float(np.float32(5.0) / np.float32(13.0))

_LUT_OPS = ("AutoContrast", "Equalize", "Posterize", "Solarize")
_BLEND_OPS = ("Brightness", "Color", "Contrast", "Sharpness")
_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


class StrongDraws(NamedTuple):
    """Every random draw of the strong augmentation of a batch of B images; row b belongs to image b."""

    op: torch.Tensor  # (B, n) int64 in 0..len(OPS)-1: the ops, applied left to right
    value: torch.Tensor  # (B, n) float64: each op's value v, in [min, max) of its OPS entry
    cutout: torch.Tensor  # (B,) float64 in [0, CUTOUT_MAX): Cutout's side over the width (0: no Cutout)
    cutout_x: torch.Tensor  # (B,) float64: Cutout's centre column (continuous, pixels)
    cutout_y: torch.Tensor  # (B,) float64: Cutout's centre row


def draw_strong(
    batch: int, generator: torch.Generator, n_ops: int = N_OPS, height: int = 32, width: int = 32
) -> StrongDraws:
    """The draws of MLKD's strong augmentation for ``batch`` images of ``height`` x ``width``, on the CPU.

    Ops uniform over :data:`OPS` with replacement, values uniform in [min, max), ``cutout`` uniform in [0, 0.5),
    Cutout centres uniform in (1, width] and (1, height] (NumPy's ``uniform(w)``, as the official code draws them).
    """
    if batch < 0 or n_ops < 0:
        raise ValueError(f"batch and n_ops must be non-negative, got {batch} and {n_ops}")
    lo = torch.tensor([lo for _, lo, _ in OPS], dtype=torch.float64)
    hi = torch.tensor([hi for _, _, hi in OPS], dtype=torch.float64)
    op = torch.randint(len(OPS), (batch, n_ops), generator=generator)
    u = torch.rand((batch, n_ops), generator=generator, dtype=torch.float64)
    value = lo[op] + (hi[op] - lo[op]) * u  # the official min + float(max - min) * random.random()
    cutout = torch.rand(batch, generator=generator, dtype=torch.float64) * CUTOUT_MAX
    # np.random.uniform(w) is uniform(low=w, high=1.0) = w + (1 - w) * u: the official centres lie in (1, w].
    cutout_x = width + (1 - width) * torch.rand(batch, generator=generator, dtype=torch.float64)
    cutout_y = height + (1 - height) * torch.rand(batch, generator=generator, dtype=torch.float64)
    return StrongDraws(op, value, cutout, cutout_x, cutout_y)


def apply_strong(images_uint8: torch.Tensor, draws: StrongDraws) -> torch.Tensor:
    """MLKD's strong augmentation of a uint8 batch (B, 3, H, W) with the given draws; returns uint8 (B, 3, H, W).

    Runs on the images' device (the draws are moved there); the input is not modified. Each of the ``n`` op slots
    computes its three families (lookup-table ops, blends, geometric ops) on the whole batch and selects per image,
    so there is no host synchronisation and no per-image loop.
    """
    x = images_uint8
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    b = x.shape[0]
    if draws.op.dim() != 2 or draws.op.shape != draws.value.shape or draws.op.shape[0] != b:
        raise ValueError(f"{b} images but draws of shape op {tuple(draws.op.shape)}, value {tuple(draws.value.shape)}")
    device = x.device
    ops = draws.op.to(device)
    values = draws.value.to(device, torch.float64)
    for slot in range(ops.shape[1]):
        x = _apply_op(x, ops[:, slot], values[:, slot])
    return _cutout(
        x, draws.cutout.to(device, torch.float64), draws.cutout_x.to(device, torch.float64),
        draws.cutout_y.to(device, torch.float64),
    )  # fmt: skip


def _is(op: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """(B,) bool: whether image b's op is one of ``names`` (compared with Python ints: no host-device copy)."""
    mask = torch.zeros_like(op, dtype=torch.bool)
    for name in names:
        mask |= op == OP_INDEX[name]
    return mask


def _apply_op(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Image b of x (B, 3, H, W) uint8 through op ``op[b]`` with value ``v[b]`` (both (B,)); uint8 (B, 3, H, W)."""
    out = x
    selected = (
        (_is(op, _LUT_OPS), _lut_ops),
        (_is(op, _BLEND_OPS), _blend_ops),
        (_is(op, _GEOMETRIC_OPS), _geometric_ops),
    )
    for mask, family in selected:
        out = torch.where(mask.view(-1, 1, 1, 1), family(x, op, v), out)
    return out  # Identity keeps x


# ----------------------------------------------------------------------------------------------- lookup tables


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histograms (B, C, 256) int64 of x (B, C, H, W) uint8.

    One scatter-add into a flat (B*C*256,) tensor: a one-dimensional scatter_add_ is among the kernels that
    ``torch.use_deterministic_algorithms(True)`` allows on CUDA (and integer sums are exact in any order).
    """
    b, c, h, w = x.shape
    bins = x.reshape(b * c, h * w).long() + 256 * torch.arange(b * c, device=x.device).view(-1, 1)
    hist = torch.zeros(b * c * 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(0, bins.view(-1), torch.ones_like(bins).view(-1))
    return hist.view(b, c, 256)


def _lut_ops(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """AutoContrast, Equalize, Posterize or Solarize of each image (the others get an identity table)."""
    b, c, h, w = x.shape
    device = x.device
    levels = torch.arange(256, device=device)  # (256,) int64
    hist = _histogram(x)  # (B, C, 256)
    present = hist > 0
    lo = present.int().argmax(dim=2, keepdim=True)  # (B, C, 1): darkest level present
    hi = 255 - present.flip(2).int().argmax(dim=2, keepdim=True)  # brightest level present
    identity = levels.expand(b, c, 256)

    # AutoContrast: ImageOps builds int(i * scale + offset) in Python floats (float64), in this order.
    span = (hi - lo).clamp(min=1).to(torch.float64)
    # Tensor by tensor: torch turns `scalar / tensor` (and, on CUDA, `tensor / scalar`) into a multiplication by a
    # reciprocal, which is not the correctly rounded quotient Python computes.
    scale = torch.full_like(span, 255.0) / span
    offset = -lo.to(torch.float64) * scale
    stretched = (levels.to(torch.float64) * scale + offset).trunc().clamp(0, 255).long()
    autocontrast = torch.where(hi > lo, stretched, identity)

    # Equalize: step = (pixels - count of the brightest level) // 255; lut[i] = (step // 2 + #pixels < i) // step;
    # identity if one level or fewer is present or step is 0. Image.point clips table values above 255.
    step = (h * w - hist.gather(2, hi)) // 255  # (B, C, 1)
    flat = (present.sum(dim=2, keepdim=True) <= 1) | (step == 0)
    below = hist.cumsum(dim=2) - hist  # (B, C, 256): pixels darker than each level
    safe_step = torch.where(flat, torch.ones_like(step), step)
    equalize = torch.where(flat, identity, ((safe_step // 2 + below) // safe_step).clamp(max=255))

    # Posterize keeps the top max(1, int(v)) bits; Solarize inverts the levels >= v (v a float threshold).
    bits = v.trunc().long().clamp(1, 8).view(b, 1, 1)
    posterize = levels & ~((1 << (8 - bits)) - 1)
    solarize = torch.where(levels < v.view(b, 1, 1), levels, 255 - levels)

    opv = op.view(b, 1, 1)
    lut = torch.where(opv == OP_INDEX["AutoContrast"], autocontrast, identity)
    lut = torch.where(opv == OP_INDEX["Equalize"], equalize, lut)
    lut = torch.where(opv == OP_INDEX["Posterize"], posterize, lut)
    lut = torch.where(opv == OP_INDEX["Solarize"], solarize, lut)
    return lut.gather(2, x.reshape(b, c, h * w).long()).view(b, c, h, w).to(torch.uint8)


# ------------------------------------------------------------------------------------------------------ blends


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L conversion of x (B, 3, H, W) uint8; returns int32 (B, 1, H, W) in 0..255."""
    r, g, bl = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + bl * 7471 + 0x8000) >> 16).unsqueeze(1)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """``ImageFilter.SMOOTH`` of x (B, C, H, W) uint8 as Pillow computes it; float32 (B, C, H, W) whole numbers.

    Pillow sums each 3x3 window in float32 row by row (row y+1, then y, then y-1; left to right within a row)
    onto 0.5 with the kernel pre-divided by 13, then truncates; the one-pixel border is the input's.
    """
    xf = x.to(torch.float32)
    edge, centre = _SMOOTH_EDGE, _SMOOTH_CENTRE

    def row(r: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:  # (B, C, H-2, W) -> (B, C, H-2, W-2)
        return r[..., :-2] * edge + r[..., 1:-1] * middle + r[..., 2:] * edge

    ss = row(xf[:, :, 2:], edge) + 0.5  # float32 addition commutes exactly: same as 0.5 + row
    ss = ss + row(xf[:, :, 1:-1], centre)
    ss = ss + row(xf[:, :, :-2], edge)
    out = xf.clone()
    out[:, :, 1:-1, 1:-1] = ss.clamp(0, 255).trunc()
    return out


def _blend_ops(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Brightness, Color, Contrast or Sharpness: ``Image.blend(degenerate, x, v)`` with the op's degenerate."""
    b, _, h, w = x.shape
    opv = op.view(b, 1, 1, 1)
    grey = _grey(x)  # (B, 1, H, W) int32
    # Contrast: int(mean + 0.5) of the grey image, the mean a float64 quotient as ImageStat computes it.
    total = grey.sum(dim=(1, 2, 3), dtype=torch.int64).to(torch.float64)
    mean = total / torch.full_like(total, h * w)  # tensor by tensor: see _lut_ops
    contrast = (mean + 0.5).floor().view(b, 1, 1, 1)
    xf = x.to(torch.float32)
    degenerate = torch.zeros_like(xf)  # Brightness blends with black
    degenerate = torch.where(opv == OP_INDEX["Color"], grey.to(torch.float32), degenerate)
    degenerate = torch.where(opv == OP_INDEX["Contrast"], contrast.to(torch.float32), degenerate)
    degenerate = torch.where(opv == OP_INDEX["Sharpness"], _smooth(x), degenerate)
    # ImagingBlend: out = (UINT8)(in1 + alpha * (in2 - in1)) in float32, alpha the float32 of v. Separate
    # multiply and add (no fused multiply-add), as Pillow's x86-64 build computes it.
    alpha = v.to(torch.float32).view(b, 1, 1, 1)
    blended = degenerate + alpha * (xf - degenerate)
    return blended.clamp(0, 255).trunc().to(torch.uint8)


# --------------------------------------------------------------------------------------------- geometric ops


def _fix16(a: torch.Tensor) -> torch.Tensor:
    """Pillow's 16.16 fixed point of float64 ``a``: floor(a * 65536 + 0.5), int64."""
    return (a * 65536.0 + 0.5).floor().long()


def _geometric_ops(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate, ShearX, ShearY, TranslateX or TranslateY of each image, nearest neighbour, fill 0."""
    b, c, h, w = x.shape
    device = x.device
    f64 = torch.float64
    one, zero = torch.ones_like(v), torch.zeros_like(v)

    # Image.rotate(v): angle = v % 360 (Python's float modulo, v + 360 for negative v), matrix entries
    # round(cos(-radians(angle)), 15) etc., translation computed around the centre (w / 2, h / 2).
    angle = -(torch.where(v < 0, v + 360.0, v) * (math.pi / 180.0))
    cos = torch.round(torch.cos(angle), decimals=15)
    sin = torch.round(torch.sin(angle), decimals=15)
    cx, cy = w / 2, h / 2
    rot_c = cos * -cx + sin * -cy + 0.0 + cx
    rot_f = -sin * -cx + cos * -cy + 0.0 + cy

    # The affine matrix (a0, a1, a2, a3, a4, a5) maps output (x, y) to input (a0 x + a1 y + a2, a3 x + a4 y + a5).
    is_rot, is_sx, is_sy = (op == OP_INDEX[n] for n in ("Rotate", "ShearX", "ShearY"))
    a0 = torch.where(is_rot, cos, one)
    a1 = torch.where(is_rot, sin, torch.where(is_sx, v, zero))
    a2 = torch.where(is_rot, rot_c, zero)
    a3 = torch.where(is_rot, -sin, torch.where(is_sy, v, zero))
    a4 = torch.where(is_rot, cos, one)
    a5 = torch.where(is_rot, rot_f, zero)
    # affine_fixed: coefficients in 16.16, the output pixel centres' half-pixel offsets folded into the constant
    # terms (left to right, as Pillow adds them), source pixel = accumulated position >> 16.
    fixed = [_fix16(a) for a in (a0, a1, (a2 + a0 * 0.5) + a1 * 0.5, a3, a4, (a5 + a3 * 0.5) + a4 * 0.5)]
    k0, k1, k2, k3, k4, k5 = (k.view(b, 1, 1) for k in fixed)
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    src_x = (k2 + ys * k1 + xs * k0) >> 16  # (B, H, W); arithmetic shift = floor division, as in C
    src_y = (k5 + ys * k4 + xs * k3) >> 16

    # Translations take Pillow's scaling path: float64 position t + 0.5 + x, floored (negative = outside).
    shift_x = (v * w + 0.5).view(b, 1, 1)
    shift_y = (v * h + 0.5).view(b, 1, 1)
    tx = (shift_x + xs.to(f64)).floor().long().expand(b, h, w)
    ty = (shift_y + ys.to(f64)).floor().long().expand(b, h, w)
    opv = op.view(b, 1, 1)
    src_x = torch.where(opv == OP_INDEX["TranslateX"], tx, src_x)
    src_y = torch.where(opv == OP_INDEX["TranslateY"], ty, src_y)

    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)  # (B, H, W)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    moved = x.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return torch.where(inside.unsqueeze(1), moved, torch.zeros((), dtype=x.dtype, device=device))


# ----------------------------------------------------------------------------------------------------- Cutout


def _cutout(x: torch.Tensor, c: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Cutout of each image of x (B, 3, H, W) uint8: side ``c * W`` (no Cutout where c <= 0), centre (cx, cy).

    Corners as the official code computes them, then ``ImageDraw.rectangle``: int() of each corner, rows and
    columns filled inclusive of the far corner and clipped to the image.
    """
    b, _, h, w = x.shape
    side = c * w  # the side is a fraction of the width, for both directions, as in the official code
    x0 = (cx - side / 2.0).clamp(min=0).trunc()
    y0 = (cy - side / 2.0).clamp(min=0).trunc()
    x1 = torch.minimum(x0 + side, torch.full_like(x0, w)).trunc()
    y1 = torch.minimum(y0 + side, torch.full_like(y0, h)).trunc()
    cols = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w)
    rows = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1)
    box = (
        (cols >= x0.view(b, 1, 1)) & (cols <= x1.view(b, 1, 1))
        & (rows >= y0.view(b, 1, 1)) & (rows <= y1.view(b, 1, 1))
        & (c > 0).view(b, 1, 1)
    )  # fmt: skip
    # Three fills on the device, not torch.tensor(CUTOUT_FILL, device=...): that would copy from the host
    # (and wait for the copy) at every batch.
    fill = torch.stack([x.new_full((), v) for v in CUTOUT_FILL]).view(1, 3, 1, 1)  # (1, 3, 1, 1) uint8
    return torch.where(box.unsqueeze(1), fill, x)
