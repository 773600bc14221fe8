"""Pixel-level differences behind two fidelity choices (docs/fidelity.md), on real photos.

    python bench/view_pixels.py

Images: scikit-learn's two bundled photos (china.jpg, flower.jpg, 640 x 427), so it runs offline.
1. Evaluation view: open_clip's eval transform (resize the short side, then center-crop; what dho
   evaluates with now) against cropping the central square first and resizing it after (what dho
   did before), per output size and interpolation: PSNR in dB (higher = closer; identical = inf).
2. Training views of the low-shot reference: one RandomResizedCrop box resized bicubically to the
   teacher's 378 px, then that image resized to the student's 224 px; dho replays the box straight
   at 224 px. PSNR over 32 views per photo. The reference scored Table 4 on these views too (its
   test set had the training transform); `dho evaluate --views random` replays them at 224 px.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image

from dho import data


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    photos = {name: Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")}
    print("1. evaluation view: open_clip eval transform vs crop-then-resize (PSNR dB, min over the photos)")
    for interpolation in ("bicubic", "bilinear"):
        cells = []
        for size in (32, 224, 336, 378, 427, 448):
            worst = math.inf
            for image in photos.values():
                new = data.eval_view_uint8(image, size, interpolation, "shortest").numpy()
                box = data.center_view_params(image.width, image.height, "shortest")
                old = data.replay_view_uint8(image, box, size, interpolation).numpy()
                worst = min(worst, psnr(new, old))
            cells.append(f"{size}px {worst:.1f}")
        print(f"   {interpolation}: " + ", ".join(cells))

    print("2. training view: reference (box -> 378 px -> 224 px, bicubic) vs dho (box -> 224 px, bicubic), 32 views per photo")
    values = []
    for name, image in photos.items():
        for view in range(32):
            box = data.view_params(name, view, 0, image.width, image.height)
            direct = data.replay_view_uint8(image, box, 224, "bicubic").numpy()
            at_teacher = Image.fromarray(data.replay_view_uint8(image, box, 378, "bicubic").permute(1, 2, 0).numpy())
            two_step = np.asarray(at_teacher.resize((224, 224), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
            values.append(psnr(direct, two_step))
    print(f"   PSNR min {min(values):.1f} dB, median {float(np.median(values)):.1f} dB, max {max(values):.1f} dB")


if __name__ == "__main__":
    main()
