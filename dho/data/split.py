"""`split`: a labeled subset of a dataset (K shots per class, P% class-balanced or a keys file) and an
optional validation split, written as new datasets that keep the source's order, keys and bytes.

Which rows each split takes is decided from the columns alone (`rows_by_class`, `percent_allocation`,
`_match_keys`). With the samples' byte spans (a local columnar manifest) their tar members are copied
as they are, reading only the chosen samples (`CopyWriter`), each parsed and checked as a reader checks
it (key, label member against the labels column, member digest, the shard's size); else every touched shard is read in a
process pool and its chosen samples are re-written (`ShardWriter`). Both outputs are built in hidden
siblings and swapped into place once both are complete (`atomic.replace_folders`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

import dho
from dho.atomic import replace_folders
from dho.data.classes import class_fields
from dho.data.manifest import (MANIFEST, Dataset, ShardInfo, check_out, decode_strings, encode_strings, make_manifest,
                               write_manifest)
from dho.data.pool import pool_map
from dho.data.reader import CHANGED, IMAGE_EXTS, RESTORE, check_sample, check_shard_size, shard_samples
from dho.data.shards import CopyWriter, PathLike, ShardWriter, file_sha256, sample_digest, span_samples
from dho.errors import ConfigError, DatasetError, check_number
from dho.text_files import read_lines


def percent_allocation(class_sizes: Sequence[int], percent: float) -> list[int]:
    """Per-class counts for P% class-balanced: largest-remainder allocation of round(P% of N).

    Quotas q_c = T * n_c / N with T = P/100 * N rounded half up; each class gets floor(q_c), at least 1, and
    the rest goes one by one to the largest fractional parts (ties: lower class index). If the
    at-least-one rule overshoots T, the most over-allocated classes give one back (down to 1).
    """
    sizes = np.asarray(class_sizes, dtype=np.int64)
    n = int(sizes.sum())
    target = max(int(math.floor(percent / 100.0 * n + 0.5)), int((sizes > 0).sum()))
    quota = target * sizes / n  # (C,)
    alloc = np.maximum(np.floor(quota).astype(np.int64), (sizes > 0).astype(np.int64))
    # hand out the rest by largest remainder (ties: lower class index); alloc + 1 <= ceil(quota) <= n_c
    room = np.flatnonzero(alloc < sizes)
    order = room[np.lexsort((room, -(quota[room] - alloc[room])))]
    alloc[order[: max(target - int(alloc.sum()), 0)]] += 1
    # the at-least-one rule overshot: the most over-allocated class gives one back, until on target
    while alloc.sum() > target:
        excess = np.where(alloc > 1, alloc - quota, -np.inf)
        alloc[int(np.argmax(excess))] -= 1
    return alloc.tolist()


def _read_keys_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"keys file {path} not found; give a text file with one key or file name per line")
    entries = {}  # insertion-ordered set: linear in the file, whatever its length
    for line in read_lines(path, "keys file", DatasetError):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.setdefault(line, None)
    entries = list(entries)
    if not entries:
        raise DatasetError(f"{path}: lists no keys; write one key or file name per line")
    return entries


def _in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """(n,) bool: values[i] in sorted_set (sorted, unique): a binary search per value, O(n log m), without
    sorting `values` as np.isin does."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def _basenames(names: np.ndarray) -> np.ndarray:
    """(n,) bytes paths -> (n,) bytes after the last '/' (vectorised)."""
    return np.char.rpartition(names, b"/")[:, 2] if len(names) else names


def _match_keys(ds: Dataset, entries: list[str], where: Path) -> list[int]:
    """Global rows named by key, key basename, original file name or file basename (+ stem without image ext).

    Linear in the dataset and the list, vectorised: the dataset's name columns are matched against
    the set of candidate names with numpy, and only matching rows become Python objects."""
    candidates = set(entries)
    for entry in entries:
        stem, _, ext = entry.rpartition(".")
        if stem and ext.lower() in IMAGE_EXTS:
            candidates.add(stem)
    wanted = encode_strings(sorted(candidates))  # (m,) bytes
    columns = [ds.key_bytes, _basenames(ds.key_bytes)]
    if ds.columns.files is not None:
        columns += [ds.columns.files, _basenames(ds.columns.files)]
    names: dict[str, int] = {}
    ambiguous: set[str] = set()
    for col in columns:
        for row in np.flatnonzero(_in_sorted(col, wanted)).tolist():
            name = col[row].decode("utf-8")
            if name in names and names[name] != row:
                ambiguous.add(name)
            names.setdefault(name, row)
    rows, unmatched = [], []
    for entry in entries:
        stem, _, ext = entry.rpartition(".")
        name = entry if entry in names else (stem if stem and ext.lower() in IMAGE_EXTS and stem in names else None)
        if name is None:
            unmatched.append(entry)
            continue
        if name in ambiguous:
            raise DatasetError(f"{where}: entry {entry!r} matches several samples of {ds.root}; use the full key or relative file name")
        rows.append(names[name])
    if unmatched:
        raise DatasetError(
            f"{where}: {len(unmatched)} of {len(entries)} entries match no sample of {ds.root} "
            f"(first {min(10, len(unmatched))}: {unmatched[:10]}); entries are keys, file names or file basenames"
        )
    rows = sorted(set(rows))
    unlabeled = [ds.key(r) for r in rows if ds.labels[r] < 0]
    if unlabeled:
        raise DatasetError(f"{where}: names unlabeled samples of {ds.root} (first: {unlabeled[:10]}); a labeled split needs labels")
    return rows


def _copy_samples(ds: Dataset, shard_index: int, role: np.ndarray, writers: list) -> None:
    """Copy the samples of one shard with role r >= 0 to writers[r], reading only their byte spans. Each span
    must hold exactly its key's members, with the label of the labels column and (v3) the digest of the
    digests column, else the shard or a column changed since the manifest was written."""
    shard = ds.shards[shard_index]
    rows = shard.offset + np.flatnonzero(role[shard.offset:shard.offset + shard.count] >= 0)
    name = f"shard {shard_index} ({shard.path})"
    if not shard.path.is_file():
        raise DatasetError(f"{name} of dataset {ds.root} is missing; restore it or re-run `dho prepare`/`dho index`")
    check_shard_size(shard, name)
    # this shard's chosen rows of the columns, read once (not element by element from the memory maps)
    spans = np.asarray(ds.columns.spans[rows]).tolist()
    labels, roles, keys = ds.labels[rows].tolist(), role[rows].tolist(), decode_strings(ds.key_bytes[rows])
    files = [None] * len(keys) if ds.columns.files is None else decode_strings(ds.columns.files[rows])
    digests = [None] * len(keys) if ds.columns.digests is None else ds.columns.digests[rows].tolist()
    fd = os.open(shard.path, os.O_RDONLY)
    try:
        for (start, end), key, label, r, file, digest in zip(spans, keys, labels, roles, files, digests):
            raw = os.pread(fd, end - start, start)
            samples = span_samples(raw, shard.path) if len(raw) == end - start else []
            if len(samples) != 1 or samples[0]["__key__"] != key:
                raise DatasetError(f"{name}: sample {key!r} is not at bytes {start}-{end} where the manifest puts it; {CHANGED}: {RESTORE}")
            check_sample(name, samples[0], label, ds.label_key, digest)
            writers[r].copy(key, label, raw, sample_digest(samples[0]) if digest is None else digest, file)
    finally:
        os.close(fd)


def rows_by_class(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Per class c, the rows with label c in increasing order: one stable sort, O(N log N), not O(N C)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")  # (N,) rows grouped by label, increasing inside a group
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))  # (C + 1,)
    return [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]


def _pick_samples(shard: ShardInfo, shard_index: int, label_key: str, root: Path, roles: np.ndarray) -> list[tuple]:
    """(role, key, ext, data, label, file) of the samples of one shard whose role (0 labeled, 1 validation,
    -1 neither; (count,)) is set, in shard order."""
    picked = []
    for j, sample in enumerate(shard_samples(shard, shard_index, label_key, root, decode=False)):
        if roles[j] >= 0:
            file = None if shard.files is None else shard.files[j]
            picked.append((int(roles[j]), sample.key, sample.ext, sample.data, sample.label, file))
    return picked


def split(dataset: Union[PathLike, Dataset], out: PathLike, shots: Optional[int] = None, percent: Optional[float] = None,
          keys_file: Optional[PathLike] = None, seed: int = 0, val_per_class: int = 0, val_out: Optional[PathLike] = None,
          shard_size: int = 1000, overwrite: bool = False, processes: Optional[int] = None) -> tuple[Dataset, Optional[Dataset]]:
    """Labeled subset (K shots per class, P% class-balanced, or a key list) + optional validation split.

    Per class, the labeled samples are permuted once with numpy Generator(seed) (classes in index
    order); the labeled split takes the first K (or the P% allocation) and the validation split the
    next M, so the labeled split does not depend on M. With a key list, validation samples are drawn
    from the rest the same way. Outputs keep the source's global order, keys and original bytes.
    Source shards are read in a pool of `processes` (default one per core; 1 = in this process).
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
    out = Path(out)
    val_out = None if val_out is None else Path(val_out)
    if sum(x is not None for x in (shots, percent, keys_file)) != 1:
        raise ConfigError("give exactly one of shots (--shots K), percent (--percent P) or keys_file (--keys FILE)")
    if shots is not None:
        check_number("--shots", shots, low=1, integer=True)
    if percent is not None:
        check_number("--percent", percent, low=0, low_open=True, high=100)
    check_number("--val-per-class", val_per_class, low=0, integer=True)
    check_number("--shard-size", shard_size, low=1, integer=True)
    check_number("--seed", seed, low=0, high=2**32 - 1, integer=True)
    if val_per_class and val_out is None:
        raise ConfigError("--val-per-class needs --val-out DIR")
    outs = [out] + ([val_out] if val_per_class else [])
    for o in outs:
        check_out(o, overwrite, "split", sources=[ds.root])
    if val_per_class and out.resolve() == val_out.resolve():
        raise ConfigError("--out and --val-out must be different folders")

    rng = np.random.default_rng(seed)
    by_class = rows_by_class(ds.labels, ds.num_classes)  # rows per class, global order
    perms = [rng.permutation(rows) for rows in by_class]
    provenance = {"command": "split", "source_fingerprint": ds.fingerprint, "source": str(ds.root), "seed": seed,
                  "val_per_class": val_per_class, "dho_version": dho.__version__}
    if keys_file is not None:
        keys_file = Path(keys_file)
        labeled = _match_keys(ds, _read_keys_file(keys_file), keys_file)
        taken = np.zeros(ds.num_samples, dtype=bool)
        taken[labeled] = True
        perms = [p[~taken[p]] for p in perms]
        want = [0] * ds.num_classes
        provenance.update(method="keys", keys_file=keys_file.name, keys_sha256=file_sha256(keys_file))
    elif shots is not None:
        want = [shots] * ds.num_classes
        provenance.update(method="shots", shots=shots)
    else:
        sizes = [len(r) for r in by_class]
        if sum(sizes) == 0:
            raise DatasetError(f"{ds.root}: has no labeled samples to split")
        want = percent_allocation(sizes, percent)
        provenance.update(method="percent", percent=percent, rounding="largest-remainder, at least 1 per class")
    short = [f"{ds.classnames[c]!r} has {len(perms[c])}" for c in range(ds.num_classes) if len(perms[c]) < want[c] + val_per_class]
    if short:
        need = f"{want[0]} + {val_per_class}" if shots is not None else f"the allocation + {val_per_class}"
        raise DatasetError(f"{ds.root}: not enough labeled samples per class for {need} (validation): {', '.join(short[:10])}; lower --shots/--val-per-class")
    if keys_file is None:
        labeled = sorted(int(r) for c in range(ds.num_classes) for r in perms[c][:want[c]])
    val = sorted(int(r) for c in range(ds.num_classes) for r in perms[c][want[c]:want[c] + val_per_class])

    with replace_folders(*outs) as tmps:
        role = np.full(ds.num_samples, -1, dtype=np.int64)  # (N,) 0 = labeled, 1 = validation
        role[labeled] = 0
        role[val] = 1
        # with the samples' byte spans (a local columnar manifest) their tar members are copied as they are,
        # reading only the chosen samples; else every touched shard is read (in a process pool) and its
        # chosen samples are re-written
        copy = ds.columns.spans is not None and all(isinstance(sh.path, Path) for sh in ds.shards)
        writers = [(CopyWriter if copy else ShardWriter)(t, shard_size) for t in tmps]
        touched = [s for s, shard in enumerate(ds.shards) if (role[shard.offset:shard.offset + shard.count] >= 0).any()]
        if copy:
            for s in touched:
                _copy_samples(ds, s, role, writers)
        else:
            tasks = [(ds.shards[s].standalone(), s, ds.label_key, ds.root, role[ds.shards[s].offset:ds.shards[s].offset + ds.shards[s].count])
                     for s in touched]
            for picked in pool_map(_pick_samples, tasks, processes):
                for r, key, ext, data, label, file in picked:
                    writers[r].write(key, ext, data, label, file)
        for r, (t, w) in enumerate(zip(tmps, writers)):
            prov = dict(provenance, role="labeled" if r == 0 else "validation")
            manifest = make_manifest(ds.classnames, w.close(), [], prov, label_key=ds.label_key if copy else "cls",
                                     classes=class_fields(ds))
            write_manifest(manifest, t / MANIFEST)
    return Dataset.open(out), (Dataset.open(val_out) if val_per_class else None)
