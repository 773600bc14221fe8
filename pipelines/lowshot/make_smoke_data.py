"""Inputs of `make reproduce-lowshot SMOKE=1`: a tiny ImageNet-shaped folder and a tiny teacher.

    python pipelines/lowshot/make_smoke_data.py --out runs/smoke/imagenet \
        --teacher-config tests/assets/tiny-clip.json --teacher-out runs/smoke/smoke-teacher.pt

Writes `OUT/train/<class>/<class>_NNNN.JPEG` (12 per class) and `OUT/val/<class>/...` (4 per
class) for 4 colour classes, JPEGs of varied sizes (24-64 px, portrait and landscape), named
like ImageNet files so a SimCLR-style key list would match them. Each class has its own mean
colour plus noise, so even a 1-epoch student is above chance. The teacher is the tiny open_clip
config with random weights (seed 0) saved as a plain state_dict, loaded by
`dho precompute-teacher --model CONFIG.json --pretrained FILE` through the same code as real
weights. Both outputs are written to a temporary name and renamed, so Make never sees half of
them. Deterministic: same arguments, same bytes.

Out of scope: anything ImageNet-sized; this only exercises the Make graph on CPU in seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230), "yellow": (230, 210, 40)}
PER_CLASS = {"train": 12, "val": 4}


def write_image_folder(out: Path, seed: int = 0) -> Path:
    """OUT/{train,val}/<class>/<class>_NNNN.JPEG, built in OUT.tmp and renamed to OUT."""
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, count in PER_CLASS.items():
        for name, colour in CLASSES.items():
            folder = tmp / split / name
            folder.mkdir(parents=True)
            for j in range(count):
                w, h = int(rng.integers(24, 65)), int(rng.integers(24, 65))
                noise = rng.integers(-50, 51, size=(h, w, 3))
                pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)  # (H, W, 3)
                Image.fromarray(pixels, "RGB").save(folder / f"{name}_{split}{j:04d}.JPEG", format="JPEG", quality=90)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def write_teacher(config: Path, out: Path, seed: int = 0) -> Path:
    """A random-init open_clip checkpoint (plain state_dict) for the model config `config`."""
    import open_clip
    import torch

    if open_clip.get_model_config(config.stem) is None:
        open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(config.stem, pretrained=None)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="ImageNet-shaped folder to write (train/ and val/).")
    parser.add_argument("--teacher-config", type=Path, required=True, help="open_clip model-config JSON of the tiny teacher.")
    parser.add_argument("--teacher-out", type=Path, required=True, help="Checkpoint file to write.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_teacher(args.teacher_config, args.teacher_out, seed=args.seed)
    write_image_folder(args.out, seed=args.seed)
    print(f"wrote {args.out} ({len(CLASSES)} classes x {PER_CLASS}) and {args.teacher_out}")


if __name__ == "__main__":
    main()
