"""Inputs of `make eval-ood SMOKE=1`: ImageNet-V2/-Sketch/-R/-A-shaped folders from the smoke ImageNet.

    python pipelines/ood/make_smoke_ood.py --imagenet runs/lowshot-smoke/imagenet --out runs/lowshot-smoke/ood/src

From the smoke ImageNet's val images (4 colour classes), laid out as the four benchmarks are distributed:
- `v2/0 ... v2/3`: class folders named by class *index* (ImageNet-V2's `0 ... 999`);
- `sketch/<class id>`: every class, the images in grayscale (Sketch: all 1000 WordNet-id folders);
- `r/<class id>`: 3 of the 4 classes, colours inverted (ImageNet-R: 200 of the 1000);
- `a/<class id>`: another 3 of the 4, images rotated (ImageNet-A: 200 of the 1000).
The class id of the smoke data is its folder name (as `classnames.py` writes it into classnames.txt).
Built in OUT.tmp and renamed, so Make never sees half of it. Deterministic.
With `--student-config C --student-out F` also a random-init checkpoint of the smoke student's config (seed 1):
the smoke student has no pretrained weights, so this stands in for them in the zero-shot student row.

Out of scope: anything realistic; this only exercises the eval-ood Make graph and the label mapping.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

SUBSETS = {"r": (0, 1, 3), "a": (0, 2, 3)}  # class indices (sorted folder order) each subset keeps


def write(imagenet: Path, out: Path) -> Path:
    val = imagenet / "val"
    folders = sorted(d.name for d in val.iterdir() if d.is_dir())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, name in enumerate(folders):
        for f in sorted((val / name).iterdir()):
            with Image.open(f) as im:
                im = im.convert("RGB")
                targets = {"v2": (str(i), im), "sketch": (name, ImageOps.grayscale(im).convert("RGB"))}
                if i in SUBSETS["r"]:
                    targets["r"] = (name, ImageOps.invert(im))
                if i in SUBSETS["a"]:
                    targets["a"] = (name, im.rotate(90, expand=True))
                for bench, (folder, image) in targets.items():
                    (tmp / bench / folder).mkdir(parents=True, exist_ok=True)
                    image.save(tmp / bench / folder / f"{f.stem}.jpg", format="JPEG", quality=90)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imagenet", type=Path, required=True, help="The smoke ImageNet folder (with val/).")
    parser.add_argument("--out", type=Path, required=True, help="Folder to write v2/, sketch/, r/, a/ into.")
    parser.add_argument("--student-config", type=Path, default=None, help="open_clip model-config JSON of the smoke student.")
    parser.add_argument("--student-out", type=Path, default=None, help="Where to write its random-init checkpoint.")
    args = parser.parse_args()
    print(f"wrote {write(args.imagenet, args.out)}")
    if args.student_config is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lowshot"))
        from make_smoke_data import write_teacher

        args.student_out.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_teacher(args.student_config, args.student_out, seed=1)}")


if __name__ == "__main__":
    main()
