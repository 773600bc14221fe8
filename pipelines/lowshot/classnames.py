"""Class names for the teacher's prompts, one per class folder of an ImageFolder tree.

    python pipelines/lowshot/classnames.py /data/imagenet/train --out runs/lowshot/classnames.txt

`dho prepare` names classes after their folders, and ImageNet's folders are WordNet ids
(`n01440764`): prompts like "itap of a n01440764." would make the zero-shot teacher useless.
Line i of the output is `FOLDER<TAB>NAME` for the i-th folder in sorted order (the class index
`dho prepare` uses); `dho index` keeps the folder names as the dataset's class ids, so ImageNet-Sketch,
-R and -A (WordNet-id folders) can later be matched to these classes (`dho prepare --classes-of`).
The names are:

- 1000 WordNet-id folders (ImageNet-1k): CLIP's curated ImageNet class names (as shipped by
  open_clip, the list Tip-Adapter and the DHO reference code use; its index order is the sorted
  WordNet ids). That list has two repeated names, which `dho index` refuses, so two are
  disambiguated with their WordNet synonyms: class 744 "missile" -> "projectile" (657 stays
  "missile") and class 836 "sunglasses" -> "sunglass" (837 stays "sunglasses");
- anything else: the folder names, with '_' read as a space.

The Makefile feeds the file to `dho index --classnames` over the shards `dho prepare` wrote.
Out of scope: other WordNet-id datasets (ImageNet-21k subsets): pass your own file instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

WNID = re.compile(r"^n\d{8}$")
# Index -> replacement for the repeated names of CLIP's list (see the module docstring).
DISAMBIGUATE = {744: "projectile", 836: "sunglass"}


def class_folders(folder: Path) -> list[str]:
    """The class folders of `folder`, sorted (the class index order of `dho prepare`)."""
    if not folder.is_dir():
        sys.exit(f"error: {folder} is not a folder; give the ImageFolder tree's train/ (one sub-folder per class)")
    folders = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        sys.exit(f"error: {folder} has no class sub-folders")
    return folders


def class_names(folder: Path) -> list[str]:
    """One readable name per class folder of `folder`, in sorted folder order."""
    folders = class_folders(folder)
    wnids = [f for f in folders if WNID.match(f)]
    if not wnids:
        return [f.replace("_", " ") for f in folders]
    if len(wnids) != len(folders) or len(folders) != 1000:
        sys.exit(
            f"error: {folder} has {len(wnids)} WordNet-id folders out of {len(folders)}; readable names are known "
            "only for the 1000 ImageNet-1k classes. Write a class names file yourself (line i = i-th folder in "
            "sorted order) and pass it as CLASSNAMES=FILE"
        )
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    for i, name in DISAMBIGUATE.items():
        names[i] = name
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="ImageFolder tree (one sub-folder per class).")
    parser.add_argument("--out", type=Path, required=True, help="Text file to write, one class name per line.")
    args = parser.parse_args()
    folders, names = class_folders(args.folder), class_names(args.folder)
    if len(set(names)) != len(names):
        sys.exit(f"error: {args.folder}: class names repeat after replacing '_' by spaces; rename the folders")
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("".join(f"{f}\t{n}\n" for f, n in zip(folders, names)), encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"wrote {len(names)} class names -> {args.out}")


if __name__ == "__main__":
    main()
