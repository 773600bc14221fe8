"""Datasets: webdataset tar shards + manifest.json, splits, ordered reading, view replay.

A dataset is a folder holding `manifest.json` and webdataset tar shards (`shard-000000.tar`, ...).
Each sample is `__key__`, the original encoded image bytes under their own lowercased extension
(`jpg`, `png`, `webp`, ...), and `cls` (ASCII int label; absent or -1 = unlabeled). The global row
of a sample is the offset of its shard (sum of the earlier counts) plus its position in the shard.
The manifest lists every shard's count, sha256 and size, and beside it, as .npy columns, every sample's
key, label, byte span and member digest (`Columns`), so readers check what they read.
A shard's path is a local file (relative to the manifest when it lies below it) or, as webdataset
spells it, a `pipe:COMMAND` URL whose command prints the tar to stdout; `dho index` expands brace
ranges (`shard-{000000..000099}.tar`) as webdataset does.

The modules, each importing only those listed before it:
    shards.py     shard paths and `pipe:` URLs, tars read and written as webdataset reads and writes them
    manifest.py   manifest.json and its columns: `Dataset`, `ShardInfo`, the fingerprint, `verify_shard`
    reader.py     the `Sample`s of a shard, image decoding, `OrderedReader` (made on first use)
    classes.py    class names files, class lists of a reference, class folders
    pool.py       the process pools of prepare, index and split
    prepare.py, index.py, split.py   the data commands
    views.py      replayable training views (RandomResizedCrop + flip), the evaluation view, and
                  `Preprocessing`, the record of how a model takes its images
    gpu_views.py  training views decoded on the device; imports torch, so it is not imported here
This file re-exports their public API. torch is imported only by what needs it (view replay, the
`OrderedReader` made on first use): the data commands (prepare, index, split) start without torch.
`dho.data.prepare`, `dho.data.index` and `dho.data.split` are the functions; their modules are
reached with `from dho.data.index import scan_shards`.
Out of scope here: the training streams of `dho distill` (`dho/stream.py`) and image augmentation
beyond the RandomResizedCrop + flip of the paper, which is reduced to replayable parameters
(`view_params` / `replay_view`).
"""

from __future__ import annotations

from dho.data.shards import (FILE, MAX_EXPANSION, PIPE, PathLike, expand_braces, file_sha256, is_url, member_key,
                             open_shard, sample_digest, shard_sha256, span_samples, tar_samples)
from dho.data.manifest import (FORMAT, MANIFEST, SHARD_COLUMNS, VERSION, Columns, Dataset, KeySet, ShardInfo, decode_strings,
                               encode_strings, first_duplicate, verify_shard)
from dho.data.reader import IMAGE_EXTS, MAX_IMAGE_PIXELS, Sample, assign_shards, decode_image, iter_shard, to_rgb8
from dho.data.classes import (CLASS_FIELDS, CLASS_FOLDERS, class_fields, map_class_folders, read_class_file,
                              read_class_list)
from dho.data.prepare import FILES_PER_TASK, NOT_READ, folder_key, prepare, write_files
from dho.data.index import URL_COMMANDS, index
from dho.data.split import percent_allocation, reference_percent_counts, rows_by_class, source_order, split
from dho.data.views import (CROP_RATIO, CROP_SCALE, FLIP_P, RESIZE_MODES, Preprocessing, center_view_params, decode_view,
                            eval_view_uint8, normalize, replay_view, replay_view_uint8, stable_seed, view_params,
                            view_seed)
from dho.errors import DatasetError

__all__ = [
    "FILE", "MAX_EXPANSION", "PIPE", "PathLike", "expand_braces", "file_sha256", "is_url", "member_key", "open_shard",
    "sample_digest", "shard_sha256", "span_samples", "tar_samples",
    "FORMAT", "MANIFEST", "SHARD_COLUMNS", "VERSION", "Columns", "Dataset", "KeySet", "ShardInfo", "decode_strings",
    "encode_strings", "first_duplicate", "verify_shard",
    "IMAGE_EXTS", "MAX_IMAGE_PIXELS", "OrderedReader", "Sample", "assign_shards", "decode_image", "iter_shard", "to_rgb8",
    "CLASS_FIELDS", "CLASS_FOLDERS", "class_fields", "map_class_folders", "read_class_file", "read_class_list",
    "FILES_PER_TASK", "NOT_READ", "folder_key", "prepare", "write_files",
    "URL_COMMANDS", "index",
    "percent_allocation", "reference_percent_counts", "rows_by_class", "source_order", "split",
    "CROP_RATIO", "CROP_SCALE", "FLIP_P", "RESIZE_MODES", "center_view_params", "decode_view", "eval_view_uint8",
    "normalize", "Preprocessing", "replay_view", "replay_view_uint8", "stable_seed", "view_params", "view_seed",
    "DatasetError",
]


def __getattr__(name: str):  # PEP 562: OrderedReader (a torch class) is made on first access, in reader.py
    if name == "OrderedReader":
        from dho.data.reader import OrderedReader

        globals()[name] = OrderedReader
        return OrderedReader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
