"""The 11 datasets of the CoOp few-shot benchmark, imported from their standard layout.

    dho import-coop NAME ROOT --out DIR      ->  DIR/train, DIR/val, DIR/test (dho datasets)

ROOT is the folder that holds the benchmark's dataset folders, laid out as CoOp's DATASETS.md says
(the layout Tip-Adapter and the DHO reference code read too):

    caltech101      ROOT/caltech-101/101_ObjectCategories/...     + split_zhou_Caltech101.json
    oxford_pets     ROOT/oxford_pets/images/...                   + split_zhou_OxfordPets.json
    stanford_cars   ROOT/stanford_cars/{cars_train,cars_test}/... + split_zhou_StanfordCars.json
    oxford_flowers  ROOT/oxford_flowers/jpg/...                   + split_zhou_OxfordFlowers.json
    food101         ROOT/food-101/images/...                      + split_zhou_Food101.json
    fgvc_aircraft   ROOT/fgvc_aircraft/images/...                 + variants.txt, images_variant_{train,val,test}.txt
    sun397          ROOT/sun397/SUN397/...                        + split_zhou_SUN397.json
    dtd             ROOT/dtd/images/...                           + split_zhou_DescribableTextures.json
    eurosat         ROOT/eurosat/2750/...                         + split_zhou_EuroSAT.json
    ucf101          ROOT/ucf101/UCF-101-midframes/...             + split_zhou_UCF101.json (middle frames, as CoOp)
    imagenet        ROOT/imagenet/images/{train,val}/<wnid>/...   + ROOT/imagenet/classnames.txt ("wnid name" lines)

A `split_zhou_*.json` holds `train`, `val` and `test` lists of `[relative path, label, class name]`;
class names and their order (label i = class i) are taken from it, so the datasets carry exactly
CoOp's names and label order. FGVCAircraft's split files are `image_id variant` lines, labels in
the order of `variants.txt`. ImageNet's labels are, as CoOp's `read_data`, the positions of the
class folders of images/train in sorted order, each named by its `classnames.txt` line (whatever
the file's line order); the images of a folder are taken in sorted order (CoOp lists them with
`os.listdir`, whose order depends on the file system; the DHO reference's torchvision ImageNet
sorts them). ImageNet has no validation split in CoOp (it evaluates on val, its test set), so
`DIR/val` is not written for it: use fixed alpha/beta (Table 6) or carve one from train with
`dho split --val-per-class`.

Each dataset keeps every sample's position in its part's list (the manifest's `source_index`
column): CoOp's few-shot sampler (`dho split --shots K --sampler coop`) goes through a class's
items in that order, so it draws CoOp's own shots although the shards hold a shuffled order.

Every file the split names must exist; a split whose counts or labels disagree with its class
list is an error naming the file and the entry. The datasets' CoOp prompts (`--templates coop:NAME`)
live with the other template sources in `dho.templates`, which names the datasets with `coop_name`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

import dho
from dho import data
from dho.atomic import guard_out
from dho.data.manifest import dataset_entries
from dho.errors import ConfigError, DatasetError, check_number
from dho.text_files import read_lines


@dataclass(frozen=True)
class CoopSpec:
    folder: str  # under ROOT
    images: str  # under the folder; split paths are relative to it
    split: Optional[str]  # the split_zhou json, or None (fgvc_aircraft, imagenet)


SPECS: dict[str, CoopSpec] = {
    "caltech101": CoopSpec("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": CoopSpec("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": CoopSpec("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": CoopSpec("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": CoopSpec("food-101", "images", "split_zhou_Food101.json"),
    "fgvc_aircraft": CoopSpec("fgvc_aircraft", "images", None),
    "sun397": CoopSpec("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": CoopSpec("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": CoopSpec("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": CoopSpec("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "imagenet": CoopSpec("imagenet", "images", None),
}
# CoOp's own class names for the datasets, accepted too
ALIASES = {"Caltech101": "caltech101", "OxfordPets": "oxford_pets", "StanfordCars": "stanford_cars",
           "OxfordFlowers": "oxford_flowers", "Flowers102": "oxford_flowers", "Food101": "food101",
           "FGVCAircraft": "fgvc_aircraft", "SUN397": "sun397", "DescribableTextures": "dtd", "DTD": "dtd",
           "EuroSAT": "eurosat", "UCF101": "ucf101", "ImageNet": "imagenet"}


def coop_name(name: str) -> str:
    """The canonical (lowercase) benchmark name of NAME or one of CoOp's spellings."""
    key = ALIASES.get(name, name.lower())
    if key not in SPECS:
        raise ConfigError(f"unknown CoOp dataset {name!r}; one of {', '.join(SPECS)}")
    return key


def _read_json_split(path: Path) -> dict[str, list]:
    if not path.is_file():
        raise DatasetError(f"{path} not found: the CoOp split file of this dataset (see CoOp's DATASETS.md)")
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    for part in ("train", "val", "test"):
        entries = split.get(part)
        if not isinstance(entries, list) or not entries:
            raise DatasetError(f"{path}: no {part!r} list of [relative path, label, class name] entries")
        for i, e in enumerate(entries):
            if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], int) and isinstance(e[2], str)):
                raise DatasetError(f"{path}: {part}[{i}] = {e!r} is not [relative path, label, class name]")
    return {part: [tuple(e) for e in split[part]] for part in ("train", "val", "test")}


def _fgvc_split(folder: Path) -> dict[str, list]:
    variants_file = folder / "variants.txt"
    if not variants_file.is_file():
        raise DatasetError(f"{variants_file} not found: FGVCAircraft's class list (see CoOp's DATASETS.md)")
    variants = [line.strip() for line in read_lines(variants_file, "FGVCAircraft class list", DatasetError) if line.strip()]
    label_of = {v: i for i, v in enumerate(variants)}
    split = {}
    for part in ("train", "val", "test"):
        path = folder / f"images_variant_{part}.txt"
        if not path.is_file():
            raise DatasetError(f"{path} not found: FGVCAircraft's {part} list (see CoOp's DATASETS.md)")
        entries = []
        for n, line in enumerate(read_lines(path, "FGVCAircraft split list", DatasetError), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise DatasetError(f"{path}:{n}: variant {variant!r} is not in {variants_file}")
            entries.append((f"{image_id}.jpg", label_of[variant], variant))
        split[part] = entries
    return split


def _imagenet_split(folder: Path) -> dict[str, list]:
    """CoOp's ImageNet (`read_classnames`, `read_data`): label = index of the class folder in the sorted
    folder names of images/train, name = that folder's line of classnames.txt; images in sorted order."""
    names_file = folder / "classnames.txt"
    if not names_file.is_file():
        raise DatasetError(f"{names_file} not found: CoOp's ImageNet class names, one 'wnid class name' line per class")
    name_of = {}
    for n, line in enumerate(read_lines(names_file, "ImageNet class names file", DatasetError), 1):
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            if not name:
                raise DatasetError(f"{names_file}:{n}: expected 'wnid class name', got {line.strip()!r}")
            name_of[wnid] = name.strip()
    train = folder / "images" / "train"
    if not train.is_dir():
        raise DatasetError(f"{train} not found: ImageNet's train folder, one sub-folder per class")
    wnids = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    unnamed = [w for w in wnids if w not in name_of]
    if unnamed:
        raise DatasetError(f"{names_file}: names no class for the folders {unnamed[:10]} of {train}; add a 'wnid class name' line for each")
    split = {}
    for part, sub in (("train", "train"), ("test", "val")):
        entries = []
        for label, wnid in enumerate(wnids):
            cdir = folder / "images" / sub / wnid
            if not cdir.is_dir():
                raise DatasetError(f"{cdir} not found: ImageNet's {sub} folder of class {wnid} ({name_of[wnid]})")
            entries += [(f"{sub}/{wnid}/{p.name}", label, name_of[wnid]) for p in sorted(cdir.iterdir())
                        if p.is_file() and p.suffix[1:].lower() in data.IMAGE_EXTS]
        split[part] = entries
    return split


def read_split(name: str, root: Path) -> tuple[dict[str, list], list[str], Path]:
    """-> ({part: [(relative path, label, class name)]}, class names by label, image folder)."""
    key = coop_name(name)
    spec = SPECS[key]
    folder = Path(root) / spec.folder
    if not folder.is_dir():
        raise DatasetError(f"{folder} not found: give the ROOT that holds CoOp's {spec.folder}/ folder")
    if key == "fgvc_aircraft":
        split = _fgvc_split(folder)
    elif key == "imagenet":
        split = _imagenet_split(folder)
    else:
        split = _read_json_split(folder / spec.split)
    names: dict[int, str] = {}
    for part, entries in split.items():
        for rel, label, classname in entries:
            if names.setdefault(label, classname) != classname:
                raise DatasetError(f"{name} {part}: label {label} is {classname!r} in entry {rel!r} but {names[label]!r} elsewhere")
    labels = sorted(names)
    if labels != list(range(len(labels))):
        missing = sorted(set(range(max(labels) + 1)) - set(labels))
        raise DatasetError(f"{name}: labels are not 0..{max(labels)} (missing {missing[:10]}); the split file is damaged")
    images = folder / spec.images if spec.images else folder
    return split, [names[i] for i in labels], images


def import_coop(name: str, root, out, *, shard_size: int = 1000, seed: int = 0, overwrite: bool = False,
                skip_bad: bool = False) -> dict[str, data.Dataset]:
    """Write OUT/train, OUT/val, OUT/test (no val for ImageNet) as dho datasets -> {part: Dataset}."""
    check_number("--shard-size", shard_size, low=1, integer=True)  # as `prepare` checks them
    check_number("--seed", seed, low=0, high=2**32 - 1, integer=True)
    key = coop_name(name)
    out = Path(out)
    split, classnames, images = read_split(key, Path(root))
    parts = [p for p in ("train", "val", "test") if p in split]
    for part in parts:
        guard_out(out / part, overwrite, what=f"dataset (import-coop {part})", sources=[images],
                  owned=dataset_entries)
    missing = [(part, rel) for part in parts for rel, _, _ in split[part] if not (images / rel).is_file()]
    if missing:
        part, rel = missing[0]
        raise DatasetError(f"{key}: {len(missing)} file(s) named by the split are missing, the first: {images / rel} ({part}); "
                           "check ROOT and that the dataset is complete")
    result = {}
    for part in parts:
        files, seen = [], {}
        for rel, label, _ in split[part]:
            file_key = data.folder_key("", rel)
            if file_key in seen:
                raise DatasetError(f"{key} {part}: {seen[file_key]!r} and {rel!r} map to the same sample key {file_key!r}")
            seen[file_key] = rel
            files.append((rel, file_key, label, rel.rsplit(".", 1)[-1].lower()))
        provenance = {"command": "import-coop", "dataset": key, "part": part, "source": str(images.resolve()),
                      "shard_size": shard_size, "seed": seed, "count": len(files), "dho_version": dho.__version__}
        order = np.random.default_rng(seed).permutation(len(files))  # shards mix classes, as prepare's
        # source_index: each sample's position in the split's list, the order CoOp's sampler goes through
        result[part] = data.write_files(images, [files[i] for i in order], classnames, out / part, shard_size=shard_size,
                                        skip_bad=skip_bad, provenance=provenance, what=f"import-coop {key} {part}",
                                        source_index=order.tolist())
        if result[part].num_samples != len(files) and not skip_bad:
            raise DatasetError(f"{key} {part}: wrote {result[part].num_samples} of the {len(files)} samples of the split")
    return result
