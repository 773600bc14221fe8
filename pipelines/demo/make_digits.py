"""The demo's real data: scikit-learn's bundled digits as ImageFolder trees of 32x32 RGB PNGs.

    python pipelines/demo/make_digits.py --out demo_out/digits --seed 0

`sklearn.datasets.load_digits()` ships 1797 real handwritten 8x8 digits (values 0..16, 10
classes) inside scikit-learn, so the demo needs no download. The samples are split,
stratified per class, into four disjoint parts:

    DIR/pretrain/<class>/*.png    ~35%  only for the stand-in VLM teacher's contrastive
                                        pre-training (train_teacher.py); dho never sees it
    DIR/task/train/<class>/*.png  ~45%  the task: `dho split` labels 5-10% of it, the rest
                                        is the unlabeled pool
    DIR/task/val/<class>/*.png     ~8%  alpha/beta search
    DIR/task/test/<class>/*.png   ~12%  final numbers only

The pre-training part (and every image's colours) is fixed: it is drawn with
`PRETRAIN_SEED` whatever `--seed` is, so the demo's shipped teacher (pipelines/demo/teacher/)
never sees a task image. `--seed` draws only how the task part is cut into train/val/test,
which is what the demo's seeds vary.

Class folders are the English words `zero` .. `nine`, so the names read naturally in prompts
("a photo of the number seven."). `dho prepare` numbers classes by sorted folder name, which
for these words is alphabetical (eight=0, five=1, four=2, nine=3, one=4, seven=5, six=6,
three=7, two=8, zero=9); `SORTED_CLASSNAMES` spells that order out.

Two scenes (`--scene`), both 32x32 RGB:
- `cluttered` (`run_demo.py --scene cluttered`): each digit is drawn at a random size (SIZE_RANGE px
  square), at a random position, in a random ink, over a random smooth texture of two random
  colours (ink and background at least MIN_CONTRAST apart). Like a photo, and unlike the 8x8
  grid, the pixels at a place say little about the class: scikit-learn on the raw pixels of 65
  labels is near chance (pipelines/demo/outside.py), while the stand-in VLM is pre-trained on
  such scenes. Every pre-training digit is rendered PRETRAIN_RENDERS times (other size, place,
  colours, texture), as a web corpus shows a concept in many scenes; a task image once.
- `plain` (the default, `make demo`'s task): the 8x8 intensities upsampled bicubically to fill the
  image, a per-image dark ink on a light background.
Every image's rendering is drawn from (PRETRAIN_SEED, its row, its render index) only, never from
`--seed`. Output is byte-identical for the same seed and scene (file names carry the row of the
digit in `load_digits()`: `digit-0042.png`, pre-training renders `digit-0042-r3.png`).

Out of scope: other datasets, augmentation (that is the teacher's and dho's business).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dho.errors import ConfigError, DatasetError

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # digit order
SORTED_CLASSNAMES = sorted(CLASSNAMES)  # class index order of the ImageFolder trees / `dho prepare`
PARTS = ("pretrain", "task/train", "task/val", "task/test")
FRACTIONS = (0.35, 0.45, 0.08, 0.12)  # of every class, in PARTS order
IMAGE_SIZE = 32  # the demo teacher's and students' input resolution: no resize in the pipeline
PRETRAIN_SEED = 0  # draws the pre-training part and the colours; never changes (the shipped teacher was trained on it)
SCENES = ("cluttered", "plain")
SIZE_RANGE = (14, 24)  # cluttered: side of the digit's square in px, uniform over the integers
MIN_CONTRAST = 110.0  # cluttered: least Euclidean RGB distance (0..255) between the ink and the texture's mean colour
TEXTURE_GRID = (2, 6)  # cluttered: the texture is a random g x g grid (g uniform in this range) upsampled bicubically
PRETRAIN_RENDERS = 6  # cluttered: renders of every pre-training digit


def split_rows(labels: np.ndarray, fractions=FRACTIONS, seed: int = 0) -> list[np.ndarray]:
    """Stratified, seeded split of row indices into len(fractions) disjoint sorted parts.

    Every class is shuffled on its own and cut at the rounded cumulative fractions, so each
    part holds round(fraction * class size) +- 1 samples of every class.
    """
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ConfigError(f"split fractions must sum to 1, got {fractions}; pass one fraction per part of {PARTS}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    bounds = np.cumsum((0.0,) + tuple(fractions))  # (P + 1,)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(len(rows))]
        cuts = np.round(bounds * len(rows)).astype(int)  # (P + 1,) from 0 to len(rows)
        for p in range(len(fractions)):
            parts[p].extend(rows[cuts[p]:cuts[p + 1]].tolist())
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def render_digit(pixels: np.ndarray, ink: np.ndarray, background: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """8x8 intensities in 0..16 -> (size, size) RGB image: bicubic upsampling, then colouring."""
    gray = Image.fromarray((pixels.astype(np.float32) / 16.0).reshape(8, 8), mode="F")
    up = np.asarray(gray.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)  # (H, W)
    up = np.clip(up, 0.0, 1.0)[..., None]  # (H, W, 1) ink coverage; bicubic overshoot clipped
    rgb = background[None, None, :] * (1.0 - up) + ink[None, None, :] * up  # (H, W, 3)
    return Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")


def render_cluttered(pixels: np.ndarray, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """8x8 intensities in 0..16 -> (size, size) RGB scene: the digit at a random size, place and ink
    over a random two-colour texture; every draw from `rng` (see the module docstring)."""
    side = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    grid = int(rng.integers(TEXTURE_GRID[0], TEXTURE_GRID[1] + 1))
    noise = Image.fromarray(rng.uniform(0.0, 1.0, size=(grid, grid)).astype(np.float32), mode="F")
    texture = np.clip(np.asarray(noise.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32), 0.0, 1.0)
    colours = rng.uniform(0.0, 255.0, size=(2, 3))  # (2, 3) the texture's two colours
    background = colours[0][None, None, :] * (1.0 - texture[..., None]) + colours[1][None, None, :] * texture[..., None]
    mean = background.reshape(-1, 3).mean(axis=0)  # (3,)
    ink = rng.uniform(0.0, 255.0, size=3)
    while np.linalg.norm(ink - mean) < MIN_CONTRAST:  # redraw until the digit stands out of its texture
        ink = rng.uniform(0.0, 255.0, size=3)
    gray = Image.fromarray((pixels.astype(np.float32) / 16.0).reshape(8, 8), mode="F")
    digit = np.clip(np.asarray(gray.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32), 0.0, 1.0)
    cover = np.zeros((size, size, 1), dtype=np.float32)
    cover[y0:y0 + side, x0:x0 + side, 0] = digit
    rgb = background * (1.0 - cover) + ink[None, None, :] * cover  # (H, W, 3)
    return Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")


def split_parts(labels: np.ndarray, seed: int, fractions=FRACTIONS) -> list[np.ndarray]:
    """The rows of the four PARTS: pretrain drawn with PRETRAIN_SEED, the task part cut by `seed`."""
    pretrain, task = split_rows(labels, (fractions[0], 1.0 - fractions[0]), PRETRAIN_SEED)
    rest = np.asarray(fractions[1:], dtype=np.float64)
    task_parts = split_rows(labels[task], tuple(rest / rest.sum()), seed)  # row indices into `task`
    return [pretrain] + [task[p] for p in task_parts]


def make_digits(out: str | Path, seed: int = 0, fractions=FRACTIONS, overwrite: bool = False,
                scene: str = "plain") -> dict:
    """Write the four ImageFolder parts under `out` and `out/digits.json`; return its content.

    `digits.json` records the seed, fractions, class names and the `load_digits()` rows of
    every part, so the split can be audited and reproduced.
    """
    from sklearn.datasets import load_digits

    if scene not in SCENES:
        raise ConfigError(f"unknown scene {scene!r}; choose one of {', '.join(SCENES)}")
    out = Path(out)
    if (out / "digits.json").exists() or (out / "pretrain").exists() or (out / "task").exists():
        if not overwrite:
            raise DatasetError(f"{out} already holds a digits export; pass overwrite=True (--overwrite) to replace it")
        for top in ("pretrain", "task"):  # stale files of another seed would overlap the new split
            shutil.rmtree(out / top, ignore_errors=True)
    digits = load_digits()
    images, labels = digits.data, digits.target.astype(np.int64)  # (1797, 64) in 0..16, (1797,)
    rng = np.random.default_rng([PRETRAIN_SEED, 1])  # colours: fixed per image, a stream separate from the split's
    inks = rng.uniform(0, 90, size=(len(labels), 3))  # (N, 3) dark ink
    backgrounds = rng.uniform(170, 255, size=(len(labels), 3))  # (N, 3) light paper
    parts = split_parts(labels, seed, fractions)

    summary = {"seed": seed, "pretrain_seed": PRETRAIN_SEED, "scene": scene, "fractions": dict(zip(PARTS, fractions)),
               "classnames": CLASSNAMES, "sorted_classnames": SORTED_CLASSNAMES, "image_size": IMAGE_SIZE, "parts": {}}
    if scene == "cluttered":
        summary.update(size_range=list(SIZE_RANGE), min_contrast=MIN_CONTRAST, texture_grid=list(TEXTURE_GRID),
                       pretrain_renders=PRETRAIN_RENDERS)
    for part, rows in zip(PARTS, parts):
        for name in CLASSNAMES:
            (out / part / name).mkdir(parents=True, exist_ok=True)
        renders = PRETRAIN_RENDERS if scene == "cluttered" and part == "pretrain" else 1
        for row in rows:
            folder = out / part / CLASSNAMES[labels[row]]
            if scene == "plain":
                render_digit(images[row], inks[row], backgrounds[row]).save(folder / f"digit-{row:04d}.png", optimize=False)
                continue
            for r in range(renders):
                image = render_cluttered(images[row], np.random.default_rng([PRETRAIN_SEED, 2, int(row), r]))
                name = f"digit-{row:04d}.png" if renders == 1 else f"digit-{row:04d}-r{r}.png"
                image.save(folder / name, optimize=False)
        summary["parts"][part] = {"num_samples": len(rows) * renders, "num_digits": len(rows),
                                  "per_class": (renders * np.bincount(labels[rows], minlength=10)).tolist(),
                                  "rows": rows.tolist()}
    (out / "digits.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (pretrain/ and task/{train,val,test}/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task part's train/val/test split (the pretrain part is fixed)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that already holds an export")
    parser.add_argument("--scene", choices=SCENES, default="plain",
                        help="plain: the 8x8 digit filling the image (the demo's default); cluttered: random size, place, ink "
                             "and texture")
    args = parser.parse_args()
    summary = make_digits(args.out, seed=args.seed, overwrite=args.overwrite, scene=args.scene)
    sizes = ", ".join(f"{p}={s['num_samples']}" for p, s in summary["parts"].items())
    print(f"wrote digits ({sizes}) -> {args.out}")


if __name__ == "__main__":
    main()
