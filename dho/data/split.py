"""`split`: a labeled subset of a dataset (K shots per class, P% class-balanced or a keys file) and an
optional validation split, written as new datasets that keep the source's order, keys and bytes.

Which rows each split takes is decided from the columns alone (`rows_by_class`, `percent_allocation`,
`_match_keys`). Two draws follow public code instead of dho's own (numpy Generator permutations over
the global rows): `--per-class equal` the DHO reference's ImageNet P% split (`reference_percent_counts`,
`_reference_percent_draw`) and `--sampler coop` CoOp's K-shot sampler (`_coop_draw`); both go
through a class's samples in the order of the list the dataset was made from (`source_order`), as
the public code goes through its file list. With the samples' byte spans (a local columnar manifest)
their tar members are copied as they are, reading only the chosen samples (`CopyWriter`), each parsed and
checked as a reader checks it (key, label member against the labels column, member digest, the shard's
size); else every touched shard is read in a process pool and its chosen samples are re-written
(`ShardWriter`). Both outputs are built in hidden
siblings and swapped into place once both are complete (`atomic.replace_folders`).
"""

from __future__ import annotations

import math
import os
import random
import sys
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
from dho.errors import ConfigError, DatasetError, check_choice, check_number
from dho.text_files import read_lines

SAMPLERS = ("numpy", "coop")  # --sampler: dho's numpy permutations (default), CoOp's random.sample
PER_CLASS = ("proportional", "equal")  # --per-class of --percent: dho's largest remainder (default), the DHO reference's


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


def reference_percent_counts(class_sizes: Sequence[int], percent: float) -> list[int]:
    """Per-class counts of the DHO reference's P% split (`datasets/imagenet_percent.py`, `balanced=True`).

    Over the C classes that have samples (N in all): every class starts at q = max(min(N/C * P/100 - 1,
    n_c), 1); the counts are its "cascade rounding" (ceil(q_c) where the running sum of q has a
    fractional part above 0.5, else floor(q_c); at most n_c), and while they add up to less than
    N * P/100, every q_c grows by 1/C (at most n_c). Float64 in the reference's order of operations, so
    the counts are the reference's own: on ImageNet 13 for every class at 1% (13,000), 128 or 129 at 10%
    (128,286). P = 100: every sample (the reference returns the whole set).
    """
    sizes = np.asarray(class_sizes, dtype=np.int64)
    present = sizes > 0
    cap = sizes[present].astype(np.float64)  # (C,) n_c of the classes with samples
    n, c = int(sizes.sum()), int(present.sum())
    counts = np.zeros(len(sizes), dtype=np.int64)
    if c == 0:
        return counts.tolist()
    if percent >= 100:
        return sizes.tolist()
    frac = percent / 100.0

    def cascade_round(q: np.ndarray) -> np.ndarray:  # (C,) -> (C,) ints, at most n_c
        running = np.cumsum(q)  # sequential float64 sums, as the reference's loop
        up = running - np.floor_divide(running, 1.0) > 0.5
        return np.minimum(np.where(up, np.ceil(q), np.floor(q)), cap).astype(np.int64)

    q = np.maximum(np.minimum(np.full(c, n / c * frac - 1.0), cap), 1.0)
    rounded = cascade_round(q)
    while rounded.sum() < n * frac:
        q = np.minimum(q + 1 / c, cap)
        rounded = cascade_round(q)
    counts[present] = rounded
    return counts.tolist()


def source_order(ds: Dataset) -> np.ndarray:
    """(N,) the rows in the order of the list the dataset was made from: its `source_index` column
    (import-coop: the split file's list, or CoOp's ImageNet listing), else by label, then file name
    (the key where the manifest has no file names, as after `dho index`): torchvision ImageFolder's
    order when the labels are the sorted class folders (dho prepare's), for flat class folders."""
    if ds.columns.source_index is not None:
        return np.argsort(np.asarray(ds.columns.source_index), kind="stable")
    if (ds.manifest.get("provenance") or {}).get("command") == "import-coop":  # shuffled into shards, list order lost
        raise DatasetError(f"{ds.root} was imported by an older dho that did not keep each sample's position in CoOp's "
                           "split file, the order CoOp's sampler draws from: re-import it with `dho import-coop ... --overwrite`")
    names = ds.columns.files if ds.columns.files is not None else ds.key_bytes
    return np.lexsort((np.asarray(names), np.asarray(ds.labels)))


def _source_groups(ds: Dataset, order: np.ndarray, first_seen: bool) -> list[tuple[int, np.ndarray]]:
    """(class, its rows in `order`) for every class with labeled samples: in label order, or (`first_seen`) in
    the order the classes first appear in `order`, as CoOp's `split_dataset_by_label` builds its dict."""
    labels = np.asarray(ds.labels)[order]
    order, labels = order[labels >= 0], labels[labels >= 0]
    grouped = np.argsort(labels, kind="stable")  # positions in `order`, grouped by class, increasing inside
    classes, starts = np.unique(labels[grouped], return_index=True)
    bounds = [*starts.tolist(), len(labels)]
    groups = [(int(cl), order[grouped[bounds[i]:bounds[i + 1]]]) for i, cl in enumerate(classes)]
    if first_seen:
        groups = [groups[i] for i in np.argsort(grouped[starts], kind="stable")]
    return groups


def _reference_percent_draw(groups: list, counts: list[int], seed: int, val_per_class: int) -> tuple[list, list]:
    """The DHO reference's draw: numpy.random.seed(seed), then per class in label order
    numpy.random.choice(its rows, count, replace=False), which takes the first `count` of a legacy
    `permutation`. Validation (dho's addition): after every labeled draw, M per class from the rest."""
    rs = np.random.RandomState(seed)
    labeled, rests = [], []
    for c, rows in groups:
        taken = np.zeros(len(rows), dtype=bool)
        taken[rs.permutation(len(rows))[:counts[c]]] = True
        labeled.append(rows[taken])
        rests.append(rows[~taken])
    val = [rest[rs.permutation(len(rest))[:val_per_class]] for rest in rests] if val_per_class else []
    return labeled, val


def _coop_draw(groups: list, shots: int, rnd: random.Random, val_per_class: int) -> tuple[list, list]:
    """CoOp's sampler (Dassl `generate_fewshot_dataset`): per class, in the order the classes first appear,
    random.sample(its items, K), or the whole class without a draw when it has fewer than K (Dassl's
    default repeat=False). Validation (dho's addition): after every labeled draw, M per class from the
    rest with random.sample, as CoOp goes on to draw the few-shot val from the same stream."""
    labeled, rests = [], []
    for _, rows in groups:
        taken = np.zeros(len(rows), dtype=bool)
        taken[rnd.sample(range(len(rows)), shots) if len(rows) >= shots else slice(None)] = True
        labeled.append(rows[taken])
        rests.append(rows[~taken])
    val = []
    for rest in rests if val_per_class else []:  # the caller checked that every rest holds M
        taken = np.zeros(len(rest), dtype=bool)
        taken[rnd.sample(range(len(rest)), val_per_class)] = True
        val.append(rest[taken])
    return labeled, val


def _coop_stream_after(after: Path, seed: int) -> random.Random:
    """random.Random(seed) advanced past the draws of the labeled split `after` (made with --sampler coop):
    they are replayed on its source, which must still be the dataset it was drawn from, and must give its samples."""
    lab = Dataset.open(after)
    p = lab.manifest.get("provenance", {})
    if p.get("command") != "split" or p.get("sampler") != "coop" or p.get("role") != "labeled":
        raise ConfigError(f"--after {after}: not a labeled split made by `dho split --shots K --sampler coop`")
    if p["seed"] != seed:
        raise ConfigError(f"--after {after} was drawn with --seed {p['seed']}; give --seed {p['seed']} to continue its stream")
    source = Dataset.open(p["source"])
    if source.fingerprint != p["source_fingerprint"]:
        raise DatasetError(f"--after {after}: its source {source.root} changed since the split was drawn; redraw the split")
    rnd = _coop_stream_after(Path(p["after"]), seed) if p.get("after") else random.Random(seed)
    labeled, _ = _coop_draw(_source_groups(source, source_order(source), first_seen=True), p["shots"], rnd,
                            p.get("val_per_class", 0))
    rows = np.sort(np.concatenate(labeled)) if labeled else np.zeros(0, dtype=np.int64)
    if decode_strings(source.key_bytes[rows]) != lab.keys:
        raise DatasetError(f"--after {after}: replaying its draw on {source.root} does not give its samples; redraw the split")
    return rnd


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
          shard_size: int = 1000, overwrite: bool = False, processes: Optional[int] = None, per_class: Optional[str] = None,
          sampler: Optional[str] = None, after: Optional[PathLike] = None) -> tuple[Dataset, Optional[Dataset]]:
    """Labeled subset (K shots per class, P% class-balanced, or a key list) + optional validation split.

    Per class, the labeled samples are permuted once with numpy Generator(seed) (classes in index
    order); the labeled split takes the first K (or the P% allocation) and the validation split the
    next M, so the labeled split does not depend on M. With a key list, validation samples are drawn
    from the rest the same way. Outputs keep the source's global order, keys and original bytes.
    Source shards are read in a pool of `processes` (default one per core; 1 = in this process).

    `per_class="equal"` (with `percent`): the DHO reference's split, its counts (`reference_percent_counts`)
    and its draw (`_reference_percent_draw`, numpy.random.seed(seed)). `sampler="coop"` (with `shots`):
    CoOp's draw (`_coop_draw`, random.seed(seed)); `after` = a labeled split drawn so continues its
    random stream, as CoOp draws the few-shot val after the train shots. Both go through each class in
    `source_order`, and draw validation samples after all the labeled ones.
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
    if per_class is not None:
        check_choice("--per-class", per_class, PER_CLASS)
        if percent is None:
            raise ConfigError("--per-class sets how --percent P is shared out over the classes; give --percent P")
    if sampler is not None:
        check_choice("--sampler", sampler, SAMPLERS)
        if sampler == "coop" and shots is None:
            raise ConfigError("--sampler coop draws K shots per class, as CoOp; give --shots K")
    if after is not None and sampler != "coop":
        raise ConfigError("--after continues the random stream of a CoOp draw; give it with --sampler coop")

    provenance = {"command": "split", "source_fingerprint": ds.fingerprint, "source": str(ds.root), "seed": seed,
                  "val_per_class": val_per_class, "dho_version": dho.__version__}
    if per_class == "equal" or sampler == "coop":
        labeled, val = _draw_as_public_code(ds, shots, percent, seed, val_per_class, after, provenance)
    else:
        labeled, val = _draw(ds, shots, percent, keys_file, seed, val_per_class, provenance)

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


def _draw_as_public_code(ds: Dataset, shots: Optional[int], percent: Optional[float], seed: int, val_per_class: int,
                         after: Optional[PathLike], provenance: dict) -> tuple[list[int], list[int]]:
    """(labeled rows, validation rows), sorted: the DHO reference's P% draw (`percent`) or CoOp's K shots."""
    groups = _source_groups(ds, source_order(ds), first_seen=shots is not None)  # CoOp: classes as first seen
    if not groups:
        raise DatasetError(f"{ds.root}: has no labeled samples to split")
    sizes = [0] * ds.num_classes
    for c, rows in groups:
        sizes[c] = len(rows)
    if shots is not None:
        want = [min(shots, n) for n in sizes]  # Dassl: a class with fewer than K gives all it has
        fewer = [f"{ds.classnames[c]!r} has {sizes[c]}" for c, _ in groups if sizes[c] < shots]
        if fewer:
            print(f"split: {len(fewer)} class(es) have fewer than {shots} samples and give them all, as CoOp's sampler: "
                  f"{', '.join(fewer[:10])}", file=sys.stderr, flush=True)
    else:
        want = reference_percent_counts(sizes, percent)
    short = [f"{ds.classnames[c]!r} has {sizes[c]}" for c, _ in groups if sizes[c] - want[c] < val_per_class]
    if short:
        raise DatasetError(f"{ds.root}: not enough labeled samples per class for the labeled split + {val_per_class} "
                           f"(validation): {', '.join(short[:10])}; lower --shots/--val-per-class")
    if shots is not None:
        rnd = random.Random(seed)
        if after is not None:
            rnd = _coop_stream_after(Path(after), seed)
            provenance.update(after=str(Path(after).resolve()))
        labeled, val = _coop_draw(groups, shots, rnd, val_per_class)
        provenance.update(method="shots", shots=shots, sampler="coop")
    else:
        labeled, val = _reference_percent_draw(groups, want, seed, val_per_class)
        provenance.update(method="percent", percent=percent, per_class="equal",
                          rounding="the DHO reference's (imagenet_percent.py): cascade rounding, the same count per class")
    flat = lambda parts: sorted(int(r) for rows in parts for r in rows)  # noqa: E731
    return flat(labeled), flat(val)


def _draw(ds: Dataset, shots: Optional[int], percent: Optional[float], keys_file: Optional[PathLike], seed: int,
          val_per_class: int, provenance: dict) -> tuple[list[int], list[int]]:
    """(labeled rows, validation rows), sorted: dho's own draw (numpy Generator(seed) permutations)."""
    rng = np.random.default_rng(seed)
    by_class = rows_by_class(ds.labels, ds.num_classes)  # rows per class, global order
    perms = [rng.permutation(rows) for rows in by_class]
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
    return labeled, val
