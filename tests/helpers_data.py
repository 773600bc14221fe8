"""Builders of tiny ImageFolder trees for tests (real image files, deterministic bytes)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# one clearly distinct mean colour per class, so tiny students can learn the classes
CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (160, 50, 200), (40, 200, 210)]


def _image(rng: np.random.Generator, colour, width: int, height: int) -> Image.Image:
    noise = rng.integers(-40, 41, size=(height, width, 3))
    pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(pixels, "RGB")


def make_image_folder(root, num_classes: int = 3, per_class: int = 8, odd: bool = False, seed: int = 0,
                      imagenet_names: bool = False) -> Path:
    """Write an ImageFolder tree `root/class_i/img_jjj.jpg` (sizes 24..40 x 20..36) and return `root`.

    With `imagenet_names=True` files are named like ImageNet's, unique across classes:
    `class_i/class_i_jjjj.JPEG` (SimCLR-style split lists name them by basename).

    With `odd=True` it adds, in class folder `class_1`: a grayscale PNG, a palette PNG, an RGBA
    PNG, a file name with dots (`photo.v2.final.jpg`), a non-ASCII name (`čaj_ünï.jpg`), a
    5000x5000 solid PNG (`huge.png`), an ignored `README.txt`; and two unreadable files:
    `class_2/broken.jpg` (truncated JPEG) and `class_2/notes.jpg` (text with an image extension).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            w, h = int(rng.integers(24, 41)), int(rng.integers(20, 37))
            name = f"class_{c}_{j:04d}.JPEG" if imagenet_names else f"img_{j:03d}.jpg"
            _image(rng, CLASS_COLOURS[c % len(CLASS_COLOURS)], w, h).save(folder / name, format="JPEG", quality=90)
    if odd:
        odd_dir, bad_dir = root / "class_1", root / "class_2"
        bad_dir.mkdir(parents=True, exist_ok=True)
        base = _image(rng, CLASS_COLOURS[1], 30, 26)
        base.convert("L").save(odd_dir / "gray.png")
        base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(odd_dir / "palette.png")
        rgba = base.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(odd_dir / "alpha.png")
        base.save(odd_dir / "photo.v2.final.jpg")
        base.save(odd_dir / "čaj_ünï.jpg")
        Image.new("RGB", (5000, 5000), CLASS_COLOURS[1]).save(odd_dir / "huge.png", compress_level=1)
        (odd_dir / "README.txt").write_text("not an image, ignored by prepare\n")
        buf = io.BytesIO()
        _image(rng, CLASS_COLOURS[2], 64, 64).save(buf, format="JPEG", quality=95)
        (bad_dir / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        (bad_dir / "notes.jpg").write_text("these are notes, not a JPEG\n")
    return root


ODD_BAD_FILES = ["class_2/broken.jpg", "class_2/notes.jpg"]
ODD_EXTRA_FILES = ["class_1/alpha.png", "class_1/gray.png", "class_1/huge.png", "class_1/palette.png",
                   "class_1/photo.v2.final.jpg", "class_1/čaj_ünï.jpg"]
