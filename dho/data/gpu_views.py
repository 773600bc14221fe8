"""Training views decoded on the device (`dho distill --decode gpu`): the batch's JPEGs in one call.

The CPU path (`data.decode_view` + `data.replay_view_uint8`, in the DataLoader workers) decodes
with PIL, crops the cached box and resizes with PIL's antialiased filters. Here the workers only
hand over the encoded bytes and the cached view params; the training process decodes the JPEGs of
a batch with torchvision's `decode_jpeg` on the device (nvJPEG on CUDA, libjpeg-turbo on the CPU),
crops the box (in the original image's pixels, as the cache stores it), resizes with
`interpolate(..., antialias=True)` and flips. Other formats (PNG, WebP, CMYK JPEGs, ...) decode on
the CPU with `data.decode_image`, so every image is RGB exactly as in the CPU path (`data.to_rgb8`).

The views match the CPU path up to resampling noise (PIL's fixed-point filters vs torch's float
ones, and the JPEG decoder): tests/test_gpu_views.py measures and bounds the difference.
Out of scope: the DCT-downscaled decode of large JPEGs (`data.decode_view`); every image decodes
at full size.
"""

from __future__ import annotations

import io
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from dho.data.reader import decode_image
from dho.errors import ConfigError, DatasetError

INTERPOLATIONS = ("bilinear", "bicubic")
DECODE_JPEG_MODES = ("RGB", "L")  # JPEG colour modes decode_jpeg turns into RGB on every device; others go through PIL


def _on_device_jpeg(blob: bytes, ext: str) -> bool:
    """A JPEG whose colour mode decode_jpeg handles (reads the header only)."""
    if ext.lower() not in ("jpg", "jpeg"):
        return False
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return im.format == "JPEG" and im.mode in DECODE_JPEG_MODES
    except (OSError, ValueError, SyntaxError):
        return False  # data.decode_image names the broken file


def decode_images(datas: Sequence[bytes], exts: Sequence[str], device) -> list[torch.Tensor]:
    """Encoded images -> list of (3, H_i, W_i) uint8 RGB tensors on `device` (JPEGs decoded there in one batch)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images: list = [None] * len(datas)
    jpegs = [i for i, (blob, ext) in enumerate(zip(datas, exts)) if _on_device_jpeg(blob, ext)]
    if jpegs:
        encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs]  # (n_bytes,) each
        for i, image in zip(jpegs, decode_jpeg(encoded, device=device, mode=ImageReadMode.RGB)):
            images[i] = image  # (3, H, W)
    for i, image in enumerate(images):
        if image is None:
            rgb = decode_image(datas[i], exts[i], f"batch image {i}")  # PIL, to_rgb8
            pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
            images[i] = pixels.permute(2, 0, 1).to(device)  # (3, H, W)
    return images


def crop_resize_flip(image: torch.Tensor, params: Sequence[int], size: int, interpolation: str) -> torch.Tensor:
    """(3, H, W) uint8 -> the box (top, left, h, w, flip) resized to (3, size, size) uint8, flipped if asked."""
    top, left, h, w, flip = (int(p) for p in params)
    height, width = image.shape[-2:]
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > height or left + w > width:
        raise DatasetError(f"view box (top={top}, left={left}, h={h}, w={w}) lies outside the {width}x{height} image; "
                           "the cache was built for other images")
    box = image[None, :, top : top + h, left : left + w].float()  # (1, 3, h, w)
    view = F.interpolate(box, size=(size, size), mode=interpolation, align_corners=False, antialias=True)  # (1, 3, S, S)
    view = view[0].round_().clamp_(0, 255).to(torch.uint8)  # bicubic overshoots: clamp as PIL does
    return view.flip(-1) if flip else view


def decode_views(datas: Sequence[bytes], exts: Sequence[str], params, size: int, interpolation: str,
                 device) -> torch.Tensor:
    """Encoded images + cached view params (B, 5) (top, left, h, w, flip) -> (B, 3, size, size) uint8 on `device`."""
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"--decode gpu resamples with bilinear or bicubic, not {interpolation!r}; use --decode cpu")
    params = torch.as_tensor(params).tolist()  # (B, 5) on the host: the boxes drive Python slicing
    if not (len(datas) == len(exts) == len(params)):
        raise ValueError(f"{len(datas)} images, {len(exts)} extensions and {len(params)} view params")
    images = decode_images(datas, exts, device)
    views = [crop_resize_flip(im, p, size, interpolation) for im, p in zip(images, params)]
    return torch.stack(views)  # (B, 3, S, S)
