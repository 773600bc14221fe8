"""Replayable strong augmentation of training views: RandAugment and random erasing, seeded per view.

A cache made with `dho precompute-teacher --augment randaugment:N,M [--erase P]` stores the options in its
attribute `augment` (schema v7); nothing per view. Each view's program (N ops with their signed
magnitudes, and an erasing box) is a pure function of (run seed, sample key, view index)
(`augment_program`, a generator seeded by `stable_seed(seed, key, view, "augment")`), as its crop box is,
so the teacher (`dho precompute-teacher`) and the student (`dho distill`, which reads the attribute) draw
the same program without storing it.

Where the ops act: on the uint8 view AFTER the crop + resize, at each model's own resolution
(`augmented_view_uint8`). Every parameter is resolution-free (translations and the erasing box are
fractions of the side), so at one resolution teacher and student get the same pixels bit for bit; at
two resolutions the same program on each resolution's view (like the crop itself). The evaluation view
(`--center-view`) is never augmented.

The ops are torchvision's RandAugment set (transforms.v2.functional on uint8 tensors, nearest-neighbour
for the geometric ones, fill 0) with its magnitudes at `M` of 31 bins (torchvision's `num_magnitude_bins`);
random erasing is torchvision's RandomErasing(p=P, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0).
The draws differ from torchvision's own (its generator consumption is not part of its API): the op set
and magnitudes are its, the sequence of random numbers is dho's.
"""

from __future__ import annotations

import math
from typing import Optional

from dho.errors import ConfigError

NUM_BINS = 31  # torchvision RandAugment num_magnitude_bins
# torchvision RandAugment's op space: name -> (max magnitude at bin 30, signed)
OPS = (
    ("Identity", 0.0, False), ("ShearX", 0.3, True), ("ShearY", 0.3, True),
    ("TranslateX", 150.0 / 331.0, True), ("TranslateY", 150.0 / 331.0, True),  # fraction of the side
    ("Rotate", 30.0, True), ("Brightness", 0.9, True), ("Color", 0.9, True), ("Contrast", 0.9, True),
    ("Sharpness", 0.9, True), ("Posterize", 4.0, False), ("Solarize", 255.0, False),
    ("AutoContrast", 0.0, False), ("Equalize", 0.0, False),
)
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)


def parse_augment(spec: Optional[str], erase: Optional[float] = None) -> Optional[dict]:
    """`--augment randaugment:N,M` and `--erase P` -> the cache attribute {"randaugment": {"num_ops", "magnitude"} | None,
    "erase": P} (None: no augmentation). One-line ConfigError for a bad spec."""
    ra = None
    if spec is not None and spec != "none":
        name, _, args = spec.partition(":")
        if name != "randaugment":
            raise ConfigError(f"--augment {spec!r}: unknown augmentation; use randaugment:N,M (e.g. randaugment:2,9) or none")
        try:
            n, m = (int(x) for x in args.split(","))
        except ValueError:
            raise ConfigError(f"--augment {spec!r}: write randaugment:N,M with integers N (ops per view) and M (magnitude 0-30)") from None
        if not 1 <= n <= 16 or not 0 <= m < NUM_BINS:
            raise ConfigError(f"--augment {spec!r}: N must be 1-16 ops per view and M a magnitude in 0-{NUM_BINS - 1}")
        ra = {"num_ops": n, "magnitude": m}
    if erase is not None and not (isinstance(erase, (int, float)) and 0.0 <= erase <= 1.0 and not math.isnan(erase)):
        raise ConfigError(f"--erase {erase!r}: the erasing probability must be in [0, 1]")
    erase = float(erase or 0.0)
    if ra is None and erase == 0.0:
        return None
    return {"randaugment": ra, "erase": erase}


def augment_program(augment: dict, seed: int, key: str, view: int) -> dict:
    """The view's program, drawn from a generator seeded by (seed, key, view) only: {"ops": [(name, value)],
    "erase": (top, left, height, width) as fractions of the side, or None}. Resolution-free; a fixed number of
    draws per op and for the erasing box whatever their outcome."""
    import torch

    from dho.data.views import stable_seed

    g = torch.Generator().manual_seed(stable_seed(seed, key, view, "augment", byteorder="big"))
    ops = []
    ra = augment.get("randaugment")
    for _ in range(ra["num_ops"] if ra else 0):
        i = int(torch.randint(len(OPS), (1,), generator=g).item())
        negative = bool(torch.rand(1, generator=g).item() < 0.5)
        name, top, signed = OPS[i]
        m = ra["magnitude"]
        if name == "Posterize":
            value = float(8 - int(round(m / ((NUM_BINS - 1) / 4))))  # bits kept
        elif name == "Solarize":
            value = 255.0 * (1.0 - m / (NUM_BINS - 1))  # threshold
        else:
            value = top * m / (NUM_BINS - 1)
        if signed and negative:
            value = -value
        ops.append((name, value))
    u = torch.rand(5, generator=g).tolist()  # erase?, area, log-ratio, top, left
    box = None
    if u[0] < augment.get("erase", 0.0):
        area = ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[1]
        lo, hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
        ratio = math.exp(lo + (hi - lo) * u[2])
        h, w = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
        box = ((1.0 - h) * u[3], (1.0 - w) * u[4], h, w)
    return {"ops": ops, "erase": box}


def apply_program(img, program: dict):
    """Apply a program to a (3, S, S) uint8 tensor -> (3, S, S) uint8 (torchvision.transforms.v2.functional)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    size = img.shape[-1]
    nearest = InterpolationMode.NEAREST
    for name, v in program["ops"]:
        if name == "ShearX":
            img = F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(v)), 0.0],
                           interpolation=nearest, fill=0, center=[0, 0])
        elif name == "ShearY":
            img = F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(v))],
                           interpolation=nearest, fill=0, center=[0, 0])
        elif name == "TranslateX":
            img = F.affine(img, angle=0.0, translate=[int(round(v * size)), 0], scale=1.0, shear=[0.0, 0.0],
                           interpolation=nearest, fill=0)
        elif name == "TranslateY":
            img = F.affine(img, angle=0.0, translate=[0, int(round(v * size))], scale=1.0, shear=[0.0, 0.0],
                           interpolation=nearest, fill=0)
        elif name == "Rotate":
            img = F.rotate(img, v, interpolation=nearest, fill=0)
        elif name == "Brightness":
            img = F.adjust_brightness(img, 1.0 + v)
        elif name == "Color":
            img = F.adjust_saturation(img, 1.0 + v)
        elif name == "Contrast":
            img = F.adjust_contrast(img, 1.0 + v)
        elif name == "Sharpness":
            img = F.adjust_sharpness(img, 1.0 + v)
        elif name == "Posterize":
            img = F.posterize(img, int(v))
        elif name == "Solarize":
            img = F.solarize(img, v)
        elif name == "AutoContrast":
            img = F.autocontrast(img)
        elif name == "Equalize":
            img = F.equalize(img)
        elif name != "Identity":
            raise ValueError(f"unknown augmentation op {name!r}")
    if program["erase"] is not None:
        top, left, h, w = program["erase"]
        t, l_ = int(round(top * size)), int(round(left * size))
        hh, ww = max(1, int(round(h * size))), max(1, int(round(w * size)))
        img = img.clone()
        img[:, t:t + hh, l_:l_ + ww] = 0
    return img.to(torch.uint8).contiguous()


def augment_view(img, augment: Optional[dict], seed: int, key: str, view: int):
    """The (3, S, S) uint8 view `view` of `key` under the cache's `augment` attribute (None: unchanged)."""
    if not augment:
        return img
    return apply_program(img, augment_program(augment, seed, key, view))
