"""A small dataset in the CoOp benchmark's layout, for `make reproduce-fewshot SMOKE=1` and the tests.

    python pipelines/fewshot/make_smoke_coop.py --root DIR --dataset oxford_pets [--classes 4]
        [--train 12 --val 6 --test 8] [--teacher-config tests/assets/tiny-clip.json --teacher-out T.pt]

Writes DIR/<the dataset's CoOp folder>/<image folder>/... JPEGs (one clearly distinct colour per
class, with noise, sizes 24-40 px) and the split file the real dataset ships with (`split_zhou_*.json`,
FGVCAircraft's `variants.txt` + `images_variant_*.txt`, ImageNet's `classnames.txt` + train/val
folders), so `dho import-coop` reads it exactly as it reads the real one. Class names are made up
("smoke class 0", ...) except that the label order is deliberately not alphabetical, to check that
CoOp's order is kept. Optionally a random-init tiny CLIP checkpoint for the smoke teacher.
Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dho.coop import SPECS, coop_name  # noqa: E402

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (160, 50, 200), (40, 200, 210)]


def _image(rng: np.random.Generator, colour) -> Image.Image:
    w, h = int(rng.integers(24, 41)), int(rng.integers(24, 41))
    noise = rng.integers(-40, 41, size=(h, w, 3))
    return Image.fromarray(np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8), "RGB")


def make_smoke_coop(root, dataset: str, classes: int = 4, train: int = 12, val: int = 6, test: int = 8, seed: int = 0) -> Path:
    """Write the fake dataset under ROOT; return ROOT/<folder>. train/val/test are images per class."""
    key = coop_name(dataset)
    spec = SPECS[key]
    folder = Path(root) / spec.folder
    images = folder / spec.images if spec.images else folder
    names = [f"smoke class {c}" for c in reversed(range(classes))]  # label 0 = "smoke class 3": not sorted
    rng = np.random.default_rng(seed)
    split = {"train": [], "val": [], "test": []}
    for part, per_class in (("train", train), ("val", val), ("test", test)):
        for label, name in enumerate(names):
            for j in range(per_class):
                if key == "imagenet":
                    sub = "val" if part == "test" else "train"
                    if part == "val":
                        continue  # CoOp's ImageNet has no val split
                    rel = f"{sub}/n{label:08d}/{part}_{label}_{j:03d}.JPEG"
                elif key == "fgvc_aircraft":
                    rel = f"{part}{label}{j:04d}.jpg"
                else:
                    rel = f"{name.replace(' ', '_')}/{part}_{j:03d}.jpg"
                path = images / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                _image(rng, COLOURS[label % len(COLOURS)]).save(path, quality=90)
                split[part].append([rel, label, name])
    if key == "fgvc_aircraft":
        (folder / "variants.txt").write_text("".join(n + "\n" for n in names))
        for part, entries in split.items():
            (folder / f"images_variant_{part}.txt").write_text("".join(f"{rel[:-4]} {name}\n" for rel, _, name in entries))
    elif key == "imagenet":
        (folder / "classnames.txt").write_text("".join(f"n{label:08d} {name}\n" for label, name in enumerate(names)))
    else:
        (folder / spec.split).write_text(json.dumps(split))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--dataset", default="oxford_pets")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--train", type=int, default=12, help="train images per class")
    ap.add_argument("--val", type=int, default=6, help="val images per class")
    ap.add_argument("--test", type=int, default=8, help="test images per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-config", type=Path, default=None, help="also write a random-init checkpoint of this open_clip config")
    ap.add_argument("--teacher-out", type=Path, default=None)
    args = ap.parse_args()
    folder = make_smoke_coop(args.root, args.dataset, args.classes, args.train, args.val, args.test, args.seed)
    print(f"wrote a {args.classes}-class {coop_name(args.dataset)} in the CoOp layout -> {folder}")
    if args.teacher_config is not None:
        import open_clip
        import torch

        open_clip.add_model_config(args.teacher_config)
        torch.manual_seed(args.seed)
        model = open_clip.create_model(args.teacher_config.stem)
        args.teacher_out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.teacher_out)
        print(f"wrote a random-init {args.teacher_config.stem} teacher -> {args.teacher_out}")


if __name__ == "__main__":
    main()
