"""Class lists: class names files, the classes of a reference, and class folders mapped onto them.

A class names file has one class per line, `NAME` or `ID<TAB>NAME` (`read_class_file`); a reference
is such a file or a dho dataset (`read_class_list`); `map_class_folders` finds the reference's class
of every folder of a distributed evaluation set (by id, name or index). `class_fields` are the
optional manifest fields that a dataset derived from another keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from dho.data.manifest import Dataset
from dho.data.shards import PathLike
from dho.errors import ConfigError, DatasetError
from dho.text_files import read_lines


def read_class_file(path: Path) -> tuple[list[str], Optional[list[str]]]:
    """A class names file -> (names, ids or None). Line i is class i: `NAME`, or `ID<TAB>NAME` where ID is
    the class's folder name in the distributed data (ImageNet: its WordNet id, e.g. `n01440764\ttench`)."""
    if not path.is_file():
        raise DatasetError(f"class names file {path} not found; give a text file with one class name per line")
    lines = [line.strip() for line in read_lines(path, "class names file", DatasetError)]
    while lines and not lines[-1]:
        lines.pop()
    for i, line in enumerate(lines):
        if not line:
            raise DatasetError(f"{path}: line {i + 1} is empty; every line up to the last is a class name (line i = class i)")
    if not lines:
        raise DatasetError(f"{path}: no class names; write one class name per line")
    tabbed = ["\t" in line for line in lines]
    if any(tabbed) and not all(tabbed):
        i = tabbed.index(not tabbed[0])
        raise DatasetError(f"{path}: line {i + 1} {'has' if tabbed[i] else 'lacks'} a tab unlike line 1; write every line "
                           "as NAME, or every line as ID<TAB>NAME")
    parts = [[x.strip() for x in line.split("\t")] for line in lines] if tabbed[0] else None
    if parts is not None:
        bad = next((i for i, p in enumerate(parts) if len(p) != 2 or not all(p)), None)
        if bad is not None:
            raise DatasetError(f"{path}: line {bad + 1} is not ID<TAB>NAME; write one class per line as ID<TAB>NAME")
    names = [p[1] for p in parts] if parts is not None else lines
    ids = [p[0] for p in parts] if parts is not None else None
    for what, values in (("class names", names), ("class ids", ids or [])):
        seen: set = set()
        dup = sorted({n for n in values if n in seen or seen.add(n)})
        if dup:
            raise DatasetError(f"{path}: {what} repeat: {dup[:10]}; {what} must be unique")
    return names, ids


def read_class_list(ref: PathLike) -> tuple[list[str], list[str]]:
    """The classes of a reference: a dho dataset folder or a class names file -> (names, ids); ids are the
    classes' folder names where known (a file's ID column, a dataset's `class_ids`), else the names."""
    ref = Path(ref)
    if ref.is_dir():
        ds = Dataset.open(ref)
        ids = ds.manifest.get("class_ids")
        return list(ds.classnames), list(ids) if ids else list(ds.classnames)
    names, ids = read_class_file(ref)
    return names, ids if ids is not None else list(names)


CLASS_FOLDERS = ("name", "index")
CLASS_FIELDS = ("class_ids", "class_subset_of")  # optional manifest fields a derived dataset keeps


def class_fields(ds: Dataset) -> dict:
    """The optional class fields of `ds`'s manifest, for datasets derived from it (splits, imports)."""
    return {k: ds.manifest[k] for k in CLASS_FIELDS if ds.manifest.get(k) is not None}


def map_class_folders(folders: Sequence[str], ref: PathLike, class_folders: str = "name") -> list[int]:
    """Index in the reference class list of each class folder of a distributed evaluation set.

    `name`: the folder is a class id of the reference (ImageNet-Sketch/-R/-A: WordNet ids) or its name
    ('_' read as a space); `index`: the folder is the class index itself (ImageNet-V2's `0` ... `999`,
    read as numbers, never sorted as strings).
    """
    if class_folders not in CLASS_FOLDERS:
        raise ConfigError(f"--class-folders {class_folders!r}: choose one of {', '.join(CLASS_FOLDERS)}")
    names, ids = read_class_list(ref)
    by_id = {c: i for i, c in enumerate(ids)}
    by_name = {c: i for i, c in enumerate(names)}
    out, taken = [], {}
    for f in folders:
        if class_folders == "index":
            if not f.isdigit() or int(f) >= len(names):
                raise DatasetError(f"class folder {f!r} is not a class index 0..{len(names) - 1} of {ref}; "
                                   "use --class-folders name for folders named by class")
            i = int(f)
        else:
            i = by_id.get(f, by_name.get(f, by_name.get(f.replace("_", " "))))
            if i is None:
                hint = " (numeric folders: --class-folders index)" if f.isdigit() else ""
                raise DatasetError(f"class folder {f!r} is neither a class id nor a class name of {ref}{hint}; "
                                   "give the class list the data was labeled with")
        if i in taken:
            raise DatasetError(f"class folders {taken[i]!r} and {f!r} both name class {i} ({names[i]!r}) of {ref}")
        taken[i] = f
        out.append(i)
    return out
