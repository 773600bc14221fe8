"""The manifest of a dataset: manifest.json and its .npy columns, opened (`Dataset`), checked, written.

manifest.json lists the class names and every shard's path, count, sha256 and size; the per-sample
keys, labels, original file names, byte spans and member digests are .npy columns beside it (`Columns`,
versions 2 and 3), or lists in the JSON (version 1, still opened); `import-coop` adds each sample's position
in the split file's list (`source_index`), the order CoOp's few-shot sampler goes through. `Dataset` opens
and checks a manifest without reading a shard (version 3: each column's size and crc32 against the
manifest's `column_checks`); readers check each sample's digest and each shard's size (`reader.py`,
`split.py`); `verify_shard` checks a shard's sha256 against it. The content fingerprint (`_fingerprint`)
is the same function for both versions. `write_manifest` writes the columns and manifest.json, each
file atomically (`atomic.write_atomic`), manifest.json last; `dataset_entries` names the files a
dataset consists of, which `check_out` lets --overwrite replace.
Out of scope: reading the samples (`reader.py`) and the tar format (`shards.py`).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from dho.atomic import guard_out, write_atomic
from dho.data.shards import PathLike, is_url, shard_path, shard_sha256
from dho.errors import DatasetError

MANIFEST = "manifest.json"
# version 3 adds the per-sample `digests` column, each shard's `size` and `column_checks`; versions 1 (keys and labels
# in the JSON) and 2 (columns without digests) still open, with the checks their manifests allow
FORMAT, VERSION = "dho-dataset", 3
READ_VERSIONS = (1, 2, 3)


class Columns:
    """Per-sample columns of a dataset in global row order, as numpy arrays (memory-mapped for v2).

    `keys` (N,) fixed-width bytes (UTF-8, zero-padded), `labels` (N,) int64 (-1 = unlabeled),
    `files` (N,) fixed-width bytes or None (original relative file names, `prepare` only),
    `source_index` (N,) int64 or None (the sample's position in the list it was imported from:
    `import-coop`'s split file; not in the fingerprint). Arrays
    only, no Python object per sample: forked DataLoader workers share them with the main process
    (reading a memory map or an inherited array copies no page)."""

    def __init__(self, keys: np.ndarray, labels: np.ndarray, files: Optional[np.ndarray], spans: Optional[np.ndarray] = None,
                 digests: Optional[np.ndarray] = None, base: int = 0, source_index: Optional[np.ndarray] = None):
        self.keys, self.labels, self.files = keys, labels, files
        self.spans = spans  # (N, 2) int64 [start, end) bytes of each sample's members in its tar, or None
        self.digests = digests  # (N,) uint32 `shards.sample_digest` of each sample's members, or None (versions 1, 2)
        self.base = base  # global row of row 0 (a shard's own slice, `ShardInfo.standalone`)
        self.source_index = source_index  # (N,) int64 position in the imported list (import-coop), or None

    @classmethod
    def from_lists(cls, keys: list, labels: list, files: Optional[list], spans: Optional[list] = None,
                   digests: Optional[list] = None, source_index: Optional[list] = None) -> "Columns":
        return cls(encode_strings(keys), np.asarray(labels, dtype=np.int64).reshape(-1),
                   None if files is None else encode_strings(files),
                   None if spans is None else np.asarray(spans, dtype=np.int64).reshape(-1, 2),
                   None if digests is None else np.asarray(digests, dtype=np.uint32).reshape(-1),
                   source_index=None if source_index is None else np.asarray(source_index, dtype=np.int64).reshape(-1))


def encode_strings(items: Sequence[str]) -> np.ndarray:
    """Strings -> (N,) numpy fixed-width bytes `S{W}` of their UTF-8, W = the longest (at least 1)."""
    encoded = [str(x).encode("utf-8") for x in items]
    return np.array(encoded, dtype=f"S{max([1, *map(len, encoded)])}")


def decode_strings(raw: np.ndarray) -> list[str]:
    """(n,) fixed-width bytes -> n strings (numpy strips the zero padding)."""
    return [b.decode("utf-8") for b in np.asarray(raw).tolist()]


_CHUNK = 1 << 20  # keys hashed and looked up per step: bounds the temporaries (~50 B per key) whatever N is
_EMPTY = -1


def _key_hashes(keys: np.ndarray, width: int) -> np.ndarray:
    """(n,) uint64 hash of (n,) fixed-width bytes keys zero-padded to `width` bytes (a multiple of 8): the
    key's 8-byte words folded with a multiply and mixed (splitmix64's finaliser). Equal keys, equal hashes."""
    words = np.ascontiguousarray(np.asarray(keys).astype(f"S{width}")).view(np.uint64).reshape(len(keys), width // 8)
    h = np.full(len(keys), 0x243F6A8885A308D3, dtype=np.uint64)
    for w in range(width // 8):
        h = (h ^ words[:, w]) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    h ^= h >> np.uint64(32)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    return h ^ (h >> np.uint64(31))


def _width(keys: np.ndarray) -> int:
    """The key width rounded up to whole 8-byte words (at least one)."""
    return max(8, -(-np.asarray(keys).dtype.itemsize // 8) * 8)


class KeySet:
    """An exact hash set of dataset keys ((m,) fixed-width bytes, e.g. `Dataset.key_bytes`): `rows(keys)` finds
    each key's row in O(len(keys)) and memory bounded per chunk, where `np.isin` sorts both byte arrays
    (O(N log N), several copies of the keys). Open addressing with linear probing, vectorised: a table of
    2-4x m rows (int64); each hash match is confirmed by comparing the bytes, so collisions never merge
    two keys. Building it also finds equal keys (`duplicates`: the rows involved, to check uniqueness)."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys  # (m,) S{W}, not copied (a memory map stays one)
        self.width = _width(keys)
        m = len(keys)
        self.mask = (1 << max(3, (2 * m - 1).bit_length())) - 1  # table size: a power of two >= 2m
        self.table = np.full(self.mask + 1, _EMPTY, dtype=np.int64)  # slot -> row of `keys`
        self.hashes = np.empty(m, dtype=np.uint64)  # (m,)
        involved = []
        for start in range(0, m, _CHUNK):
            rows = np.arange(start, min(start + _CHUNK, m), dtype=np.int64)
            self.hashes[rows] = _key_hashes(keys[start:rows[-1] + 1], self.width)
            involved += self._insert(rows)
        self.duplicates = np.unique(np.concatenate(involved)) if involved else np.zeros(0, np.int64)

    def _insert(self, rows: np.ndarray) -> list:
        """Place `rows` (their hashes known) and return the arrays of rows found equal to a placed key. Rows that
        find their slot free write it (one of several writers to a slot wins; the others retry it, and so meet the
        winner); rows that find it taken compare with its key and move to the next slot."""
        slots = (self.hashes[rows] & np.uint64(self.mask)).astype(np.int64)
        found = []
        while len(rows):
            there = self.table[slots]
            free = there == _EMPTY
            taken = ~free
            same = taken.copy()
            same[taken] = self.hashes[there[taken]] == self.hashes[rows[taken]]
            same[same] = self.keys[there[same]] == self.keys[rows[same]]
            if same.any():
                found += [rows[same], there[same]]
            self.table[slots[free]] = rows[free]
            placed = free.copy()
            placed[free] = self.table[slots[free]] == rows[free]
            retry = free & ~placed  # lost the race for a free slot: try it again, now against the winner
            advance = taken & ~same  # equal keys are placed once
            slots = np.where(advance, (slots + 1) & self.mask, slots)
            keep = retry | advance
            rows, slots = rows[keep], slots[keep]
        return found

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """(n,) int64: the row of each of `keys` in this set's keys, -1 where it is not one of them."""
        return np.concatenate([self._lookup(keys[i:i + _CHUNK]) for i in range(0, len(keys), _CHUNK)] or [np.zeros(0, np.int64)])

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """(n,) bool: which of `keys` are in the set (`np.isin(keys, set_keys)`, the same answer)."""
        return np.concatenate([self._lookup(keys[i:i + _CHUNK]) >= 0 for i in range(0, len(keys), _CHUNK)] or [np.zeros(0, bool)])

    def within(self, keys: np.ndarray) -> bool:
        """Whether every key of the set occurs among `keys` (`np.isin(set_keys, keys).all()`)."""
        hit = np.zeros(len(self.keys), dtype=bool)
        for i in range(0, len(keys), _CHUNK):
            found = self._lookup(keys[i:i + _CHUNK])
            hit[found[found >= 0]] = True
        return bool(hit.all())

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        out = np.full(len(keys), -1, dtype=np.int64)
        if len(self.keys) == 0 or len(keys) == 0:
            return out
        keys = np.asarray(keys)
        width = _width(keys)
        if width > self.width:  # a key longer than every key of the set is not in it
            short = np.asarray(keys).astype(f"S{width}").view(np.uint64).reshape(len(keys), -1)[:, self.width // 8:]
            todo = np.flatnonzero(~short.any(axis=1))
        else:
            todo = np.arange(len(keys), dtype=np.int64)
        hashes = _key_hashes(keys[todo], self.width)
        slots = (hashes & np.uint64(self.mask)).astype(np.int64)
        while len(todo):
            there = self.table[slots]
            taken = there != _EMPTY
            same = taken.copy()
            same[taken] = self.hashes[there[taken]] == hashes[taken]
            same[same] = self.keys[there[same]] == keys[todo[same]]
            out[todo[same]] = there[same]
            go_on = taken & ~same  # an empty slot ends the search: not in the set
            todo, hashes, slots = todo[go_on], hashes[go_on], (slots[go_on] + 1) & self.mask
        return out


def first_duplicate(keys: np.ndarray) -> Optional[tuple[int, int]]:
    """(i, j): the first row j whose key occurs at an earlier row, i the first of those rows; None when the keys
    are unique. O(N) (a `KeySet`), where sorting the keys is O(N log N) with copies of them."""
    rows = KeySet(keys).duplicates  # (d,) every row of each group of equal keys, ascending
    if len(rows) == 0:
        return None
    _, first = np.unique(keys[rows], return_index=True)  # first row of each group among `rows`
    later = np.setdiff1d(np.arange(len(rows)), first)
    j = int(rows[later[0]])
    i = int(rows[np.flatnonzero(keys[rows] == keys[j])[0]])
    return i, j


@dataclass(frozen=True)
class ShardInfo:
    path: Union[Path, str]  # absolute Path of a local shard; a `pipe:` URL as a str
    count: int
    offset: int  # global row of the shard's first sample
    sha256: str
    columns: Columns = field(repr=False)
    size: Optional[int] = None  # bytes of the shard file (version 3), checked when a reader opens it

    @property
    def _rows(self) -> slice:
        start = self.offset - self.columns.base
        return slice(start, start + self.count)

    @property
    def keys(self) -> list[str]:
        return decode_strings(self.columns.keys[self._rows])

    @property
    def labels(self) -> list[int]:
        return self.columns.labels[self._rows].tolist()

    @property
    def files(self) -> Optional[list[str]]:
        """Original relative file names (prepare only), else None."""
        files = self.columns.files
        return None if files is None else decode_strings(files[self._rows])

    @property
    def digests(self) -> Optional[list[int]]:
        """The samples' member digests (`shards.sample_digest`; version 3), else None."""
        digests = self.columns.digests
        return None if digests is None else digests[self._rows].tolist()

    def standalone(self) -> "ShardInfo":
        """This shard with copies of only its own rows of the columns: what a pool task is sent (O(count), not O(N))."""
        c, rows = self.columns, self._rows
        part = lambda a: None if a is None else np.array(a[rows])  # noqa: E731
        return ShardInfo(self.path, self.count, self.offset, self.sha256,
                         Columns(part(c.keys), part(c.labels), part(c.files), part(c.spans), part(c.digests), base=self.offset,
                                 source_index=part(c.source_index)),
                         self.size)

    @property
    def name(self) -> str:
        """For messages: a local shard's file name, a URL whole."""
        return self.path if is_url(self.path) else self.path.name


class Dataset:
    """A dataset folder opened from its manifest.json. Cheap: reads no shard.

    Version 2 and 3 manifests are columnar: manifest.json holds the class names, the shards (path,
    count, sha256; size in v3) and the content fingerprint computed when it was written; keys, labels,
    file names, spans and (v3) member digests are numpy arrays beside it (`manifest.keys.npy`, ...),
    opened as memory maps, so opening costs O(shards) Python objects. A v3 manifest's `column_checks`
    (each column file's size and crc32) are checked here: one pass over the column files at several
    GB/s, so a column replaced or edited after the manifest was written is refused by every reader,
    and the stored fingerprint can be trusted. Version 1 manifests (keys and labels in the JSON) still
    open; their columns are built in memory and the JSON lists are dropped."""

    def __init__(self, root: Path, manifest: dict):
        where = root / MANIFEST
        if manifest.get("format") != FORMAT or manifest.get("version") not in READ_VERSIONS:
            raise DatasetError(
                f"{where}: not a {FORMAT} manifest of version {', '.join(map(str, READ_VERSIONS))} "
                f"(format={manifest.get('format')!r}, version={manifest.get('version')!r}); "
                "re-create it with `dho prepare` or `dho index`, or use the dho version that wrote it"
            )
        self.version = manifest["version"]
        for field_ in (("classnames", "shards", "num_samples") + (("fingerprint", "columns") if self.version >= 2 else ())
                       + (("column_checks",) if self.version >= 3 else ())):
            if field_ not in manifest:
                raise DatasetError(f"{where}: field {field_!r} is missing; re-create it with `dho prepare` or `dho index`")
        self.root = root
        self.classnames = list(manifest["classnames"])
        self.num_classes = len(self.classnames)
        self.label_key = manifest.get("label_key", "cls").lower()
        per_shard = ("path", "count", "sha256") + (("keys", "labels") if self.version == 1 else ()) + (("size",) if self.version >= 3 else ())
        for i, s in enumerate(manifest["shards"]):
            missing = [f for f in per_shard if f not in s]
            if missing:
                raise DatasetError(f"{where}: shard {i} lacks {missing}; the manifest is corrupt, re-create it with `dho index`")
        counts = [s["count"] for s in manifest["shards"]]
        num = sum(counts)
        if manifest["num_samples"] != num:
            raise DatasetError(
                f"{where}: num_samples={manifest['num_samples']} but the shard counts add up to {num}; "
                "the manifest is corrupt, re-create it with `dho index`"
            )
        if self.version == 1:
            self.columns = self._v1_columns(where, manifest["shards"])
            self.fingerprint = _fingerprint(self.classnames, manifest["shards"])
            # the per-sample lists now live in the columns: drop them (a dataset stays O(shards) in Python objects)
            manifest = {**manifest, "shards": [{k: v for k, v in s.items() if k not in SHARD_COLUMNS} for s in manifest["shards"]]}
        else:
            self.columns = _open_columns(root, manifest["columns"], num, where, manifest.get("column_checks"))
            self.fingerprint = manifest["fingerprint"]
        self.manifest = manifest
        self.shards: list[ShardInfo] = []
        offset = 0
        for s in manifest["shards"]:
            self.shards.append(ShardInfo(shard_path(s["path"], root), s["count"], offset, s["sha256"], self.columns, s.get("size")))
            offset += s["count"]
        self.num_samples = offset
        self.key_bytes: np.ndarray = self.columns.keys  # (N,) S{W}
        self.labels: np.ndarray = self.columns.labels  # (N,) int64
        self._keys: Optional[list[str]] = None
        if not self._labels_in_range(root / manifest["columns"]["labels"] if self.version >= 2 else None):
            bad = np.flatnonzero((self.labels < -1) | (self.labels >= self.num_classes))
            raise DatasetError(
                f"{where}: sample {self.key(int(bad[0]))!r} has label {self.labels[bad[0]]} outside "
                f"[-1, {self.num_classes}); check the class names"
            )

    def _labels_in_range(self, column: Optional[Path]) -> bool:
        """Whether every label is in [-1, C): the column's min and max (no temporary arrays), read once per process
        for a column file (remembered by path, inode, size and mtime: `distill` opens its datasets more than once)."""
        stamp = None
        if column is not None:
            st = column.stat()
            stamp = (str(column), st.st_ino, st.st_size, st.st_mtime_ns)
        lo_hi = _LABEL_RANGES.get(stamp) if stamp is not None else None
        if lo_hi is None:
            lo_hi = (int(self.labels.min()), int(self.labels.max())) if self.num_samples else (-1, -1)
            if stamp is not None:
                _LABEL_RANGES[stamp] = lo_hi
        return -1 <= lo_hi[0] and lo_hi[1] < self.num_classes

    @staticmethod
    def _v1_columns(where: Path, shards: list) -> Columns:
        for i, s in enumerate(shards):
            count, files = s["count"], s.get("files")
            if len(s["keys"]) != count or len(s["labels"]) != count or (files is not None and len(files) != count):
                raise DatasetError(
                    f"{where}: shard {i} ({s['path']}) says count={count} but lists {len(s['keys'])} keys, "
                    f"{len(s['labels'])} labels; the manifest is corrupt, re-create it with `dho index`"
                )
        keys = [k for s in shards for k in s["keys"]]
        if len(set(keys)) != len(keys):
            raise DatasetError(f"{where}: sample keys are not unique; re-create it with `dho index`")
        with_files = bool(shards) and all(s.get("files") is not None for s in shards)
        return Columns.from_lists(keys, [lab for s in shards for lab in s["labels"]],
                                  [f for s in shards for f in s["files"]] if with_files else None)

    @property
    def keys(self) -> list[str]:
        """The N sample keys as strings (decoded on first use: O(N) Python objects; hot paths use `key_bytes`)."""
        if self._keys is None:
            self._keys = decode_strings(self.key_bytes)
        return self._keys

    def key(self, row: int) -> str:
        """The key of global row `row` (decodes one key)."""
        return self.key_bytes[row].decode("utf-8")

    @classmethod
    def open(cls, path: PathLike, verify: bool = False) -> "Dataset":
        """Open the dataset folder `path` (or its manifest.json); `verify` rechecks every shard's sha256,
        and for a columnar manifest the fingerprint and the uniqueness of the keys."""
        path = Path(path)
        root = path.parent if path.name == MANIFEST and path.is_file() else path
        where = root / MANIFEST
        if not where.is_file():
            raise DatasetError(f"{root}: no {MANIFEST} found; create one with `dho prepare` (ImageFolder) or `dho index` (shards)")
        try:
            manifest = json.loads(where.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{where}: not valid JSON ({e}); re-create it with `dho prepare` or `dho index`") from e
        ds = cls(root.resolve(), manifest)
        if verify:
            ds.verify()
        return ds

    def verify(self) -> None:
        """Recheck every shard's sha256 against the manifest (reads all shards) and the content fingerprint."""
        if self.version >= 2:
            if len(np.unique(self.key_bytes)) != self.num_samples:
                raise DatasetError(f"{self.root / MANIFEST}: sample keys are not unique; re-create it with `dho index`")
            computed = _fingerprint_columns(self.classnames, [
                {"path": str(s.path), "count": s.count, "sha256": s.sha256} for s in self.shards], self.columns)
            if computed != self.fingerprint:
                raise DatasetError(f"{self.root / MANIFEST}: the key/label columns do not match the manifest's fingerprint "
                                   "(a column file was changed or replaced); re-create it with `dho index`")
        for i in range(len(self.shards)):
            verify_shard(self, i)

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r}, samples={self.num_samples}, shards={len(self.shards)}, classes={self.num_classes})"


_LABEL_RANGES: dict = {}  # labels column file (path, inode, size, mtime) -> (min, max) label: read once per process
SHARD_COLUMNS = ("keys", "labels", "files", "spans", "digests", "source_index")  # per-sample lists of a shard entry, columns since v2
OPTIONAL_COLUMNS = ("files", "spans", "digests", "source_index")  # prepare's file names; byte spans (local tars); v3; import-coop's order


def file_crc32(path: Path) -> int:
    """crc32 of a file's bytes, read through a memory map (zlib: several GB/s; an ImageNet-sized column set of
    ~150 MB in ~50 ms)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return zlib.crc32(m)


def _open_columns(root: Path, spec: dict, num: int, where: Path, checks: Optional[dict] = None) -> Columns:
    """The columns of a v2/v3 manifest as memory maps; with `checks` (v3) each file's size and crc32 must be
    the manifest's (a column file replaced or edited after the manifest was written is refused here)."""
    arrays = {}
    for name in SHARD_COLUMNS:
        if name not in spec:
            if name in OPTIONAL_COLUMNS:
                arrays[name] = None
                continue
            raise DatasetError(f"{where}: lists no {name!r} column; re-create it with `dho prepare` or `dho index`")
        path = root / spec[name]
        if checks is not None:
            _check_column(where, name, path, checks.get(name))
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DatasetError(f"{where}: its {name} column {path.name} is missing; restore it or re-create the manifest with `dho index`") from None
        except (ValueError, OSError) as e:
            raise DatasetError(f"{where}: its {name} column {path.name} is not a readable .npy file ({e}); re-create the manifest with `dho index`") from None
        want = {"labels": ("int64", (num,)), "spans": ("int64", (num, 2)), "digests": ("uint32", (num,)),
                "source_index": ("int64", (num,))}.get(name, ("bytes", (num,)))
        kind_ok = arr.dtype.kind == "S" if want[0] == "bytes" else arr.dtype == np.dtype(want[0])
        if arr.shape != want[1] or not kind_ok:
            raise DatasetError(f"{where}: its {name} column {path.name} is {arr.dtype} {arr.shape}, expected {want[1]} "
                               f"{want[0]}; re-create the manifest with `dho index`")
        arrays[name] = arr
    return Columns(arrays["keys"], arrays["labels"], arrays["files"], arrays["spans"], arrays["digests"],
                   source_index=arrays["source_index"])


def _check_column(where: Path, name: str, path: Path, check: Optional[dict]) -> None:
    """A v3 column file against the size and crc32 its manifest recorded."""
    redo = "restore it, or re-create the manifest with `dho index --overwrite` if the shards are right"
    if not isinstance(check, dict) or not {"size", "crc32"} <= set(check):
        raise DatasetError(f"{where}: column_checks lacks the {name} column; the manifest is corrupt, re-create it with `dho index`")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DatasetError(f"{where}: its {name} column {path.name} is missing; {redo}") from None
    if size != check["size"]:
        raise DatasetError(f"{where}: its {name} column {path.name} is {size} bytes but the manifest says {check['size']}: "
                           f"the file was replaced after the manifest was written; {redo}")
    if file_crc32(path) != check["crc32"]:
        raise DatasetError(f"{where}: its {name} column {path.name} does not match the manifest's crc32: the file was "
                           f"changed after the manifest was written; {redo}")


def fingerprint_chunks(classnames: list, shard_dicts: Iterator[dict]) -> str:
    """sha256 of json.dumps({"classnames", "shards": [...]}, sort_keys, compact), fed shard by shard."""
    dump = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # noqa: E731
    h = hashlib.sha256()
    h.update(('{"classnames":' + dump(list(classnames)) + ',"shards":[').encode("utf-8"))
    for i, d in enumerate(shard_dicts):
        h.update(((',' if i else '') + dump(d)).encode("utf-8"))
    h.update(b"]}")
    return h.hexdigest()


def _fingerprint(classnames: list, shards: list) -> str:
    """sha256 of the content (class names, shard basenames, counts, sha256s, keys, labels).

    The same number for a v1 manifest and the columnar v2 manifest of the same content, so caches
    keep matching a dataset whose manifest was rewritten."""
    return fingerprint_chunks(classnames, (
        {"name": Path(s["path"]).name, "count": s["count"], "sha256": s["sha256"], "keys": s["keys"], "labels": s["labels"]}
        for s in shards))


def _fingerprint_columns(classnames: list, shards: list, columns: Columns) -> str:
    """`_fingerprint` of shards (path, count, sha256) whose keys and labels are in `columns`."""
    def dicts():
        offset = 0
        for s in shards:
            rows = slice(offset, offset + s["count"])
            yield {"name": Path(s["path"]).name, "count": s["count"], "sha256": s["sha256"],
                   "keys": decode_strings(columns.keys[rows]), "labels": columns.labels[rows].tolist()}
            offset += s["count"]
    return fingerprint_chunks(classnames, dicts())


def verify_shard(ds: Dataset, shard_index: int) -> None:
    """Raise DatasetError if shard `shard_index` is missing or its sha256 differs from the manifest (a `pipe:`
    shard is streamed and hashed)."""
    shard = ds.shards[shard_index]
    if not is_url(shard.path) and not shard.path.is_file():
        raise DatasetError(f"shard {shard_index} ({shard.path}) of dataset {ds.root} is missing; restore it or re-run `dho prepare`/`dho index`")
    digest = shard_sha256(shard.path)
    if digest != shard.sha256:
        raise DatasetError(
            f"shard {shard_index} ({shard.path}) of dataset {ds.root} changed since its manifest was written "
            f"(sha256 {digest[:12]}... != {shard.sha256[:12]}...); restore the shard or re-run `dho prepare`/`dho index`"
        )



def make_manifest(classnames: list, shards: list, skipped: list, provenance: dict, label_key: str = "cls",
                  classes: Optional[dict] = None) -> dict:
    """`classes`: optional class fields (CLASS_FIELDS) written after the class names."""
    return {
        "format": FORMAT, "version": VERSION,
        "classnames": list(classnames),
        **{k: v for k, v in (classes or {}).items() if v is not None},
        "label_key": label_key,
        "num_samples": sum(s["count"] for s in shards),
        "shards": shards,
        "skipped": skipped,
        "provenance": provenance,
    }


def write_manifest(manifest: dict, path: Path, columns: Optional[Columns] = None, fingerprint: Optional[str] = None) -> None:
    """Write a columnar (v3) manifest: the per-sample lists of `manifest["shards"]` (keys, labels, files, spans,
    digests) go to .npy columns beside `path`, named after the content fingerprint, which is computed here
    (once, at write time), each column's size and crc32 to `column_checks`; manifest.json (readable: one line per field and per shard, no timestamps)
    is replaced last and atomically, then the columns of the manifest it replaced are removed. A
    crash at any point leaves the old manifest with its own columns, or the new one with its own.
    A writer that holds the columns as arrays already (`index`) passes them with the fingerprint it
    computed shard by shard (`fingerprint_chunks`); its shards then list only path, count and sha256."""
    shards = manifest["shards"]
    if columns is None:
        fingerprint = _fingerprint(manifest["classnames"], shards)
        with_files = bool(shards) and all(s.get("files") is not None for s in shards)
        with_spans = bool(shards) and all(s.get("spans") is not None for s in shards)
        with_index = bool(shards) and all(s.get("source_index") is not None for s in shards)
        with_digests = bool(shards) and all(s.get("digests") is not None for s in shards)
        columns = Columns.from_lists([k for s in shards for k in s["keys"]], [lab for s in shards for lab in s["labels"]],
                                     [f for s in shards for f in s["files"]] if with_files else None,
                                     [sp for s in shards for sp in s["spans"]] if with_spans else None,
                                     [d for s in shards for d in s["digests"]] if with_digests else None,
                                     [i for s in shards for i in s["source_index"]] if with_index else None)
    folder = path.parent
    names, checks = {}, {}
    for name in SHARD_COLUMNS:
        arr = getattr(columns, name)
        if arr is None:
            continue
        names[name] = f"manifest.{fingerprint[:16]}.{name}.npy"
        write_atomic(folder / names[name], lambda part: _save_npy(part, arr))
        checks[name] = {"size": (folder / names[name]).stat().st_size, "crc32": file_crc32(folder / names[name])}
    manifest = dict(manifest)
    manifest.update(version=VERSION, fingerprint=fingerprint, columns=names, column_checks=checks,
                    shards=[{k: v for k, v in s.items() if k not in SHARD_COLUMNS} for s in shards])
    order = ["format", "version", "fingerprint", "columns", "column_checks"]
    manifest = {**{k: manifest[k] for k in order}, **{k: v for k, v in manifest.items() if k not in order}}
    old = _column_files(folder)

    def dump(v):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))

    lines = []
    for k, v in manifest.items():
        if k == "shards":
            body = ",\n".join(f"  {dump(s)}" for s in v)
            lines.append(f' "shards": [\n{body}\n ]' if v else ' "shards": []')
        else:
            lines.append(f" {dump(k)}: {dump(v)}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    write_atomic(path, lambda part: part.write_text(text, encoding="utf-8"))
    for name in old - set(names.values()):
        (folder / name).unlink(missing_ok=True)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save given a name would append .npy to `path`
        np.save(f, arr, allow_pickle=False)


def _column_files(folder: Path) -> set:
    """The column files named by the dho manifest in `folder` (empty if none or not a v2 manifest)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return {Path(str(n)).name for n in manifest.get("columns", {}).values()}
    except (OSError, ValueError, AttributeError):
        return set()


def dataset_entries(folder: Path) -> Optional[set]:
    """The names a dho dataset written into `folder` consists of (its manifest and the shards inside
    it), or None when `folder` holds no dho dataset."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    names = {MANIFEST} | _column_files(folder)
    for s in manifest.get("shards", []):
        path = Path(str(s.get("path", "")))
        if not path.is_absolute() and len(path.parts) == 1:
            names.add(path.name)
    return names


def check_out(out: Path, overwrite: bool, what: str, sources: Sequence[Path] = ()) -> None:
    guard_out(out, overwrite, what=f"dataset ({what})", sources=sources, owned=dataset_entries)
