"""Views of an image: the replayable RandomResizedCrop + flip of training, and the evaluation view.

A training view is a box (top, left, h, w, flip) drawn from a generator seeded by (seed, key, view)
alone (`view_params`; `view_seed`, made by `stable_seed`), so it is replayed exactly from the stored
box (`replay_view`) by the teacher and the student, each at its own size and normalisation.
`eval_view_uint8` is open_clip's eval transform pixel for pixel and `center_view_params` the box it
shows; `decode_view` is the student's decode (DCT-downscaled JPEGs). `Preprocessing` is the record of
how a model (student or teacher) takes its images: size, resampling, resize mode, mean/std; its
`random_view` is a training view at the model's size (`dho evaluate --views random`). torch and
torchvision are imported inside the functions that use them.
Strong augmentation (RandAugment, random erasing) replayed on these views is `augment.py`.
Out of scope: views decoded on the device (`gpu_views.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from dho.data.reader import to_rgb8, undecodable
from dho.errors import ConfigError, DatasetError

# RandomResizedCrop of the paper (Table 6): area fraction and aspect ratio ranges
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_P = 0.5


@dataclass(frozen=True)
class Preprocessing:
    """How a model takes its images: views of `image_size` px resampled with `interpolation`, the evaluation view
    by `resize_mode` (open_clip's shortest / squash / longest), then (x / 255 - mean) / std per channel.
    `crop_pct` is a timm student's (recorded, not applied: dho's evaluation view is open_clip's), `source` a
    teacher's (where the values came from). Files hold it as a plain dict (`to_dict`, `from_dict`): model
    files, cache attributes, export metadata."""

    image_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    crop_pct: Optional[float] = None
    source: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """From a file's dict; model files written before resize_mode existed are "shortest"."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        """{image_size, interpolation, mean, std, resize_mode[, crop_pct][, source]}: JSON-like, in field order."""
        d = {"image_size": self.image_size, "interpolation": self.interpolation, "mean": list(self.mean),
             "std": list(self.std), "resize_mode": self.resize_mode}
        d.update({k: getattr(self, k) for k in ("crop_pct", "source") if getattr(self, k) is not None})
        return d

    def replace(self, **changes) -> "Preprocessing":
        return dataclasses.replace(self, **changes)

    def eval_view(self, image: Image.Image) -> "torch.Tensor":
        """The evaluation view of an RGB image (`eval_view_uint8`), normalised -> (3, S, S) float32."""
        return normalize(eval_view_uint8(image, self.image_size, self.interpolation, self.resize_mode), self.mean, self.std)

    def random_view(self, image: Image.Image, key: str, view: int, seed: int) -> "torch.Tensor":
        """Training view `view` of the sample `key` (`view_params` of (seed, key, view), the RandomResizedCrop + flip
        of training) replayed straight at this model's size, normalised -> (3, S, S) float32."""
        box = view_params(key, view, seed, image.width, image.height)
        return replay_view(image, box, self.image_size, self.interpolation, self.mean, self.std)


def stable_seed(*items, byteorder: str) -> int:
    """A stable 63-bit seed of printable items (independent of PYTHONHASHSEED, call order, workers and ranks):
    the first 8 bytes of sha256("|".join(str(x) for x in items)) as a `byteorder` ("big" or "little") int,
    top bit dropped."""
    digest = hashlib.sha256("|".join(str(x) for x in items).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], byteorder) >> 1


def view_seed(seed: int, key: str, view: int) -> int:
    """Stable 63-bit seed of (seed, key, view): `stable_seed`, big-endian (caches store the boxes drawn from it)."""
    return stable_seed(seed, key, view, byteorder="big")


def view_params(key: str, view: int, seed: int, width: int, height: int) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip): torchvision RandomResizedCrop.get_params(scale=(0.5, 1),
    ratio=(3/4, 4/3)) + a p=0.5 flip, drawn from a generator seeded by (seed, key, view) only."""
    import torch

    g = torch.Generator().manual_seed(view_seed(seed, key, view))
    area = height * width
    log_ratio = torch.log(torch.tensor(CROP_RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(CROP_SCALE[0], CROP_SCALE[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            break
    else:  # central crop, aspect ratio clamped into the range
        in_ratio = width / height
        if in_ratio < min(CROP_RATIO):
            w, h = width, int(round(width / min(CROP_RATIO)))
        elif in_ratio > max(CROP_RATIO):
            w, h = int(round(height * max(CROP_RATIO))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = bool(torch.rand(1, generator=g).item() < FLIP_P)
    return top, left, h, w, flip


RESIZE_MODES = ("shortest", "squash", "longest")


def center_view_params(width: int, height: int, resize_mode: str) -> tuple[int, int, int, int, bool]:
    """The region of the original image that the evaluation view (`eval_view_uint8`) shows, as a box:
    `shortest` = the central square (torchvision rounding), `squash` and `longest` = the whole image.
    Stored in the cache for the center view; the view itself is made by `eval_view_uint8`."""
    if resize_mode in ("squash", "longest"):
        return 0, 0, height, width, False
    if resize_mode == "shortest":
        side = min(width, height)
        return int(round((height - side) / 2.0)), int(round((width - side) / 2.0)), side, side, False
    raise ConfigError(f"unknown resize_mode {resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")


def eval_view_uint8(image: Image.Image, size: int, interpolation: str, resize_mode: str) -> torch.Tensor:
    """The evaluation view, pixel for pixel open_clip's eval transform for this preprocessing -> (3, S, S) uint8.

    shortest: resize the short side to `size` (torchvision Resize on the PIL image), then center-crop
    S x S; squash: resize to S x S; longest: resize the long side to S keeping the ratio, then
    center-crop-or-pad with black to S x S. (Cropping first and resizing after, as training views
    do, resamples on another grid: up to 27 dB PSNR apart at some sizes.)
    """
    import torch

    from torchvision.transforms import functional as TF
    from torchvision.transforms import InterpolationMode

    if interpolation not in ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"):
        raise ConfigError(f"unknown interpolation {interpolation!r}; use bilinear or bicubic")
    mode = InterpolationMode(interpolation)
    image = image if image.mode == "RGB" else image.convert("RGB")
    if resize_mode == "squash":
        view = TF.resize(image, [size, size], mode)
    elif resize_mode == "shortest":
        view = TF.center_crop(TF.resize(image, size, mode), size)
    elif resize_mode == "longest":
        ratio = max(image.height / size, image.width / size)
        view = TF.center_crop(TF.resize(image, [round(image.height / ratio), round(image.width / ratio)], mode), size)
    else:
        raise ConfigError(f"unknown resize_mode {resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
    return torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


def replay_view_uint8(image: Image.Image, params: Sequence, size: int, interpolation: str) -> torch.Tensor:
    """Crop the box (top, left, h, w, flip) from the RGB image, resize to (size, size), flip -> (3, size, size) uint8.

    Integer boxes are cropped then resized (as torchvision's resized_crop, bit for bit); a box with
    fractional coordinates (`decode_view` on a downscaled JPEG) is resampled at sub-pixel precision.
    """
    import torch

    top, left, h, w = (float(p) for p in params[:4])
    flip = bool(params[4])
    if interpolation not in _INTERPOLATION:
        raise ConfigError(f"unknown interpolation {interpolation!r}; use one of {sorted(_INTERPOLATION)}")
    if top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > image.height + 1e-6 or left + w > image.width + 1e-6:
        raise DatasetError(f"view box (top={top:g}, left={left:g}, h={h:g}, w={w:g}) lies outside the {image.width}x{image.height} image; "
                           "the cache was built for other images")
    image = image if image.mode == "RGB" else image.convert("RGB")
    if all(v.is_integer() for v in (top, left, h, w)):
        view = image.crop((int(left), int(top), int(left + w), int(top + h))).resize((size, size), _INTERPOLATION[interpolation])
    else:
        view = image.resize((size, size), _INTERPOLATION[interpolation], box=(left, top, left + w, top + h))
    if flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., 3, S, S) -> float32 in [0, 1], then (x - mean) / std per channel, on x's device."""
    import torch

    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float().div_(255.0) - mean_t) / std_t


def replay_view(image: Image.Image, params: Sequence, size: int, interpolation: str,
                mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Crop the box from the original RGB image, resize to (size, size), flip, to [0, 1], normalise -> (3, size, size)."""
    return normalize(replay_view_uint8(image, params, size, interpolation), mean, std)


def decode_view(data: bytes, ext: str, where: str, params: Sequence, size: int) -> tuple[Image.Image, tuple]:
    """Decode an image for one crop box that will be resized to `size`; returns (RGB image, box in its pixels).

    JPEGs are decoded DCT-downscaled (libjpeg's 1/2, 1/4, 1/8) as long as the box keeps at least
    `size` pixels on its short side, and the box is scaled with the image: a 4000x3000 photo cropped
    to 224 px decodes about 8x faster. The view differs from a full decode by resampling noise only.
    The box then comes back in the smaller image's (fractional) pixels; other formats, and boxes
    that do not allow a reduction, decode at full size with the box unchanged.
    """
    top, left, h, w, flip = (int(p) for p in params)
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if top < 0 or left < 0 or h < 1 or w < 1 or top + h > height or left + w > width:
                raise DatasetError(f"{where}: view box (top={top}, left={left}, h={h}, w={w}) lies outside the "
                                   f"{width}x{height} image; the cache was built for other images")
            reduce = min(h, w) / size
            if im.format == "JPEG" and reduce >= 2:
                im.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
            im.load()
            image = to_rgb8(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise undecodable(where, ext, e) from e
    if image.size == (width, height):
        return image, (top, left, h, w, flip)
    fx, fy = image.width / width, image.height / height  # 1/2, 1/4 or 1/8 (up to libjpeg's rounding up)
    return image, (top * fy, left * fx, min(h * fy, image.height - top * fy), min(w * fx, image.width - left * fx), flip)
