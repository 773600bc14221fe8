"""`prepare`: an ImageFolder tree -> a dataset of deterministic webdataset shards + manifest, original bytes.

`prepare` lists the class folders and their image files (sample keys by `folder_key`) and hands them
to `write_files`, which reads and fully decodes every file once in a process pool to check it, and
writes the shards and the manifest into a hidden sibling of the output folder, swapped into place when
complete (`atomic.replace_folders`). Out of scope: re-encoding or resizing (the shards hold the files'
own bytes).
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

import dho
from dho.atomic import replace_folders
from dho.data.classes import CLASS_FOLDERS, map_class_folders, read_class_list
from dho.data.manifest import MANIFEST, Dataset, check_out, make_manifest, write_manifest
from dho.data.pool import pool_map
from dho.data.reader import IMAGE_EXTS  # importing reader raises PIL's pixel limit to MAX_IMAGE_PIXELS
from dho.data.shards import PathLike, ShardWriter
from dho.errors import ConfigError, DatasetError, check_choice, check_number
from dho.progress import Progress

# what `prepare` says about files it does not read (all are listed in the manifest's `ignored`)
NOT_READ = {"heic": "HEIC needs a plug-in PIL does not have; convert to JPEG or PNG",
            "heif": "HEIF needs a plug-in PIL does not have; convert to JPEG or PNG",
            "avif": "AVIF needs a plug-in PIL may not have; convert to JPEG or PNG",
            "gif": "GIF is animated or palette-only; convert the frame you want to PNG"}


def folder_key(classname: str, rel_in_class: str) -> str:
    """`class/sub/stem` with dots of the stem replaced: webdataset splits a member name at the first '.' of its basename."""
    parent, _, base = rel_in_class.rpartition("/")
    stem = base.rsplit(".", 1)[0].replace(".", "_")
    return "/".join(p for p in (classname, parent, stem) if p)


def _read_and_check(path: Path) -> tuple[Optional[bytes], Optional[str]]:
    """(bytes, None) for a readable image, (None, reason) otherwise; full decode catches truncation."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return data, None
    except UnidentifiedImageError:  # its message holds the BytesIO's address: the manifest would differ run to run
        return None, "UnidentifiedImageError: cannot identify the image format"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, f"{type(e).__name__}: {e}"


def _read_and_check_files(src: Path, files: Sequence[str]) -> list[tuple[Optional[bytes], Optional[str]]]:
    return [_read_and_check(src / file) for file in files]


FILES_PER_TASK = 16  # images a pool worker reads and decodes per task: ~2 MB of ImageNet JPEGs, a few ms


def prepare(src: PathLike, out: PathLike, shard_size: int = 1000, skip_bad: bool = False, overwrite: bool = False,
            shuffle: bool = True, seed: int = 0, classes_of: Optional[PathLike] = None, class_folders: str = "name",
            processes: Optional[int] = None) -> Dataset:
    """ImageFolder tree -> deterministic webdataset shards + manifest.json (original bytes, no re-encode).

    Class index = position in the sorted class folder names (as torchvision's ImageFolder); files are
    taken recursively, sorted by relative path; only image extensions (IMAGE_EXTS) are used, hidden
    files are ignored. Every image is fully decoded once to validate it.

    With `shuffle` (the default) the samples are written in a seeded random order, so every shard
    holds a mix of classes: training streams read whole shards, and class-sorted shards would give
    batches of a handful of classes. The order is still deterministic (same input + seed -> same bytes).

    With `classes_of` (a dho dataset or a class names file, see `read_class_list`) the class folders
    name classes of that list (`map_class_folders`): the dataset's classes are the named ones in the
    reference's order, under the reference's names, and the manifest records `class_subset_of` (the
    reference's size and each class's index in it) and `class_ids` (the folder names). Evaluation
    sets distributed as subsets (ImageNet-R/-A: 200 of the 1000) are then scored on their classes.

    Files are read and decoded in a process pool, one process per core (`processes` sets the number;
    1 = in this process); the output does not depend on it.
    """
    src, out = Path(src), Path(out)
    check_number("--shard-size", shard_size, low=1, integer=True)
    check_number("--seed", seed, low=0, high=2**32 - 1, integer=True)
    check_choice("--class-folders", class_folders, CLASS_FOLDERS)
    if class_folders != "name" and classes_of is None:
        raise ConfigError(f"--class-folders {class_folders} says what a folder names in the --classes-of list; give --classes-of")
    if not src.is_dir():
        raise DatasetError(f"{src} is not a folder; give an ImageFolder tree (one sub-folder per class)")
    check_out(out, overwrite, "prepare", sources=[src])
    folders = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DatasetError(f"{src} has no class sub-folders; an ImageFolder tree has one folder per class")
    classnames, classes = folders, None
    if classes_of is not None:
        ref_names, ref_ids = read_class_list(classes_of)
        indices = map_class_folders(folders, classes_of, class_folders)
        order = sorted(range(len(folders)), key=lambda j: indices[j])  # the reference's class order
        folders = [folders[j] for j in order]
        indices = [indices[j] for j in order]
        classnames = [ref_names[i] for i in indices]
        classes = {"class_ids": [ref_ids[i] for i in indices],
                   "class_subset_of": {"reference": str(Path(classes_of).resolve()), "num_classes": len(ref_names),
                                       "indices": indices}}

    files: list[tuple[str, str, int, str]] = []  # (relative file, key, label, ext)
    ignored: list[dict] = []  # files of other types, listed in the manifest and the output
    seen: dict[str, str] = {}
    for label, classname in enumerate(folders):
        cdir = src / classname
        rels = []
        for p in sorted(cdir.rglob("*")):
            rel = p.relative_to(cdir)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if p.is_symlink() and not p.exists():  # a link to nothing: said, not silently dropped
                ignored.append({"file": f"{classname}/{rel.as_posix()}", "reason": f"a symbolic link to {os.readlink(p)}, "
                                "which does not exist; fix or remove the link"})
                continue
            if not p.is_file():
                continue
            ext = p.suffix[1:].lower()
            if ext in IMAGE_EXTS:
                rels.append(rel.as_posix())
            else:
                reason = NOT_READ.get(ext, f"extension {p.suffix or '(none)'!r} is not an image format dho reads "
                                           f"({', '.join(IMAGE_EXTS)})")
                ignored.append({"file": f"{classname}/{rel.as_posix()}", "reason": reason})
        if not rels:
            raise DatasetError(f"class folder {cdir} holds no image files ({', '.join(IMAGE_EXTS)}); remove it or add images")
        for rel in rels:
            key = folder_key(classname, rel)
            file = f"{classname}/{rel}"
            if key in seen:
                raise DatasetError(
                    f"{src}: files {seen[key]!r} and {file!r} map to the same sample key {key!r} "
                    "(keys drop the extension and replace dots with '_'); rename one of them"
                )
            seen[key] = file
            files.append((file, key, label, rel.rsplit(".", 1)[1].lower()))

    if shuffle:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    provenance = {"command": "prepare", "source": str(src.resolve()), "shard_size": shard_size,
                  "shuffle": shuffle, "seed": seed, "skip_bad": skip_bad, "dho_version": dho.__version__}
    if classes_of is not None:
        provenance.update(classes_of=str(classes_of), class_folders=class_folders)
    return write_files(src, files, classnames, out, shard_size=shard_size, skip_bad=skip_bad, provenance=provenance,
                       ignored=ignored, what=f"prepare {src}", classes=classes, processes=processes)


def write_files(src: Path, files: list[tuple[str, str, int, str]], classnames: list[str], out: Path, *, shard_size: int,
                skip_bad: bool, provenance: dict, ignored: Sequence[dict] = (), what: str = "prepare",
                classes: Optional[dict] = None, processes: Optional[int] = None,
                source_index: Optional[Sequence[int]] = None) -> Dataset:
    """Write image files (relative file under `src`, key, label, ext), in this order, as a dataset at `out`:
    original bytes, every image decoded once to check it (in a pool of `processes`, default one per core,
    FILES_PER_TASK at a time), built beside `out` and renamed into place. `source_index` (one per file):
    each file's position in the list it came from, kept as the manifest's `source_index` column."""
    if source_index is not None and len(source_index) != len(files):
        raise ValueError(f"write_files: {len(source_index)} source indices for {len(files)} files")
    with replace_folders(out) as (tmp,):
        writer = ShardWriter(tmp, shard_size)
        skipped = []
        progress = Progress(what, len(files), unit="files")
        batches = [files[start:start + FILES_PER_TASK] for start in range(0, len(files), FILES_PER_TASK)]
        tasks = [(src, [file for file, _, _, _ in batch]) for batch in batches]
        indices = iter(source_index) if source_index is not None else None
        for batch, checked in zip(batches, pool_map(_read_and_check_files, tasks, processes)):
            for (file, key, label, ext), (data, reason) in zip(batch, checked):
                index = None if indices is None else next(indices)
                if data is None:
                    skipped.append({"file": file, "reason": reason})
                    continue
                writer.write(key, ext, data, label, file, source_index=index)
            progress.update(len(batch))
        shards = writer.close()
        skipped.sort(key=lambda s: s["file"])
        if skipped and not skip_bad:
            listed = "; ".join(f"{src / s['file']}: not a readable image ({s['reason']})" for s in skipped[:20])
            more = f" (and {len(skipped) - 20} more)" if len(skipped) > 20 else ""
            raise DatasetError(f"{listed}{more}; fix or remove them, or pass --skip-bad to leave them out")
        if not shards:
            raise DatasetError(f"{src}: no readable images at all; nothing to write")
        manifest = make_manifest(classnames, shards, skipped, provenance, classes=classes)
        manifest["ignored"] = list(ignored)
        write_manifest(manifest, tmp / MANIFEST)
    if ignored:
        kinds = {}
        for item in ignored:
            ext = Path(item["file"]).suffix.lower() or "(no extension)"
            kinds[ext] = kinds.get(ext, 0) + 1
        print(f"{what}: ignored {len(ignored)} file(s) that are not images dho reads ("
              + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + f"); listed under 'ignored' in {out / MANIFEST}",
              file=sys.stderr, flush=True)
    return Dataset.open(out)
