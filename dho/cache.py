"""The teacher cache: a Zarr v3 group of per-view teacher probabilities (stage 1 -> stage 2).

This is the only module that imports zarr. The layout is defined by `cache_schemas/v<N>.json`
(JSON Schema of the group attributes + the `x-dho-arrays` table, resolved by `dho.cache_layout`) and
documented in `cache_schemas/README.md`; every open validates both, so a cache of another schema version,
another dataset or another class list fails with a message saying what differs.

It holds `TeacherCache` (create or open, checks against a dataset and parameters, checked readers, unit
writers), the key codec (`encode_keys` / `decode_keys`) and the one densify / re-temper pair of the
teacher targets, `densify_topk` and `retemper`: numpy for the readers, torch tensors on any device for
the training loop (torch is imported only for them). `dho cache-info`'s summary is `dho.cache_info`.

Other readers (schema v3): every array is a core Zarr v3 data type with named dimensions, so
`xarray.open_zarr(path, consolidated=False)` and tensorstore's `zarr3` driver open the whole
store; `keys` is a (N, W) uint8 matrix of zero-padded UTF-8 (`decode_keys`), because the
variable-length `string` data type of v1/v2 is a zarr-python extension that tensorstore rejects.
`open_xarray` is that xarray view with coordinates: class names on `class`, decoded keys on `sample`.

Writing rules (a Zarr chunk file is the unit of writing; two writers in one chunk lose data):
- the store is created complete (attributes, keys, labels, text_classifier, empty arrays) in a
  temporary folder and renamed into place, so it appears atomically and creation is race-safe:
  several processes may try, one rename wins, the others open the winner's store;
- a work unit is one (view, dataset shard); along N the chunk length L divides every shard
  offset, so a unit is whole chunks and is written by exactly one process;
- `done[v, s] = 1` (its own (1, 1) chunk) is written only after the unit's chunks are written
  and fsynced; resuming skips done units and rewrites the others from scratch.

Unreadable samples (`precompute --skip-bad`): `valid[i] = False`, their `probs` / `topk_probs` /
`embeddings` rows are NaN, `topk_indices` and `view_params` rows are -1. Readers must mask with
`TeacherCache.valid`; the NaNs make a forgotten mask fail loudly instead of silently.

Damage is reported, never read as data (schema v2): every chunk carries a crc32c checksum, every
chunk is stored (also one equal to the fill value), so a missing chunk of a finished unit is an
error and not a block of fill values, and every row read is checked to be what it claims (a
probability distribution, a box inside the image). The error names the array, view, shard and
chunk. Every zarr read of chunks goes through `_load`, so no zarr error reaches the user. The arrays
that are not per view (`WHOLE_ARRAYS`) are read whole, checking that each chunk file exists;
`dho distill` reads all of them on open (`check_arrays`), `dho cache-info --verify` every chunk
(`verify`). Version-1 caches have no checksums; the row checks still apply to them.

Out of scope: remote object stores (the atomic-rename creation and fsync need a local path).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ShardingCodec, ZstdCodec

import dho
from cache_schemas import CURRENT_VERSION, KNOWN_VERSIONS, SCHEMA_NAME, load_schema
from dho.atomic import fsync, remove_stale, temp_sibling
from dho.cache_layout import dataset_mismatch, expected_arrays, member_group, row_bytes, shard_group
from dho.errors import CacheError

# attributes that must be equal for a rerun to add units to an existing store ("don't mix")
PARAM_KEYS = (
    "dataset_fingerprint", "num_samples", "classnames", "shard_counts", "chunk_len", "num_views", "center_view",
    "seed", "zeta", "eta", "teacher", "templates", "text_classifier_norm", "preprocess", "precision", "topk",
    "store_embeddings", "embed_dim", "augment",
)
VIEW_PARAM_FIELDS = ("top", "left", "height", "width", "flip")
# store every chunk, also one equal to the fill value: a chunk file that is missing is then damage
zarr.config.set({"array.write_empty_chunks": True})
SUM_TOLERANCE = 1e-2  # |sum(p) - 1| of a stored float16 row (C roundings of at most 2^-11 each, relative)
# the arrays that are not per view, each read whole (`TeacherCache.verify_arrays`; distill checks them on open)
WHOLE_ARRAYS = ("keys", "labels", "valid", "done", "text_classifier")
READ_BLOCK_BYTES = 64 << 20  # rows of a whole array read at once (whole chunks): bounds the memory of a check
REBUILD = "rebuild the cache with `dho precompute-teacher` into a new --out"
# the arrays each member of an ensemble cache (schema v6) has of its own, in `teachers/<i>/`
MEMBER_ARRAYS = ("probs", "embeddings", "text_classifier")
# what a member of an ensemble has of its own in the attributes (`teachers[i]`); selecting it puts them on top
MEMBER_ATTRS = ("teacher", "text_classifier_norm", "preprocess", "precision", "store_embeddings", "embed_dim")
MEAN = "mean"  # `TeacherCache.select`: the ensemble's arithmetic mean (the only teacher of a single-teacher cache)


def prompt_names(attrs: dict) -> str:
    """The rule that put the class names into the prompts of the cache with attributes `attrs`: its
    `teacher.prompt_names` (schema v5), else "as-given" (v1-v4). Where no class name holds a `_` every rule
    gives the same prompts, so such a cache reads as the current rule (`dho.templates.PROMPT_NAMES`)."""
    from dho.templates import PROMPT_NAMES

    if not any("_" in c for c in attrs["classnames"]):
        return PROMPT_NAMES
    return attrs["teacher"].get("prompt_names", "as-given")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def encode_keys(keys: list[str]) -> np.ndarray:
    """Sample keys -> (N, W) uint8: UTF-8, zero-padded to W = the longest key's bytes (at least 1).

    Exact for any key without a NUL character: UTF-8 never puts a zero byte inside another character."""
    encoded = [str(k).encode("utf-8") for k in keys]
    bad = next((k for k, e in zip(keys, encoded) if b"\0" in e), None)
    if bad is not None:
        raise CacheError(f"sample key {bad!r} contains a NUL character, which the cache's zero-padded keys cannot hold")
    width = max([1, *map(len, encoded)])
    return np.array(encoded, dtype=f"S{width}").view(np.uint8).reshape(len(encoded), width)  # (N, W)


def decode_keys(raw: np.ndarray) -> list[str]:
    """(N, W) uint8 zero-padded UTF-8 (schema v3 `keys`) -> N strings."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)  # (N, W)
    return [b.decode("utf-8") for b in raw.view(f"S{raw.shape[1]}")[:, 0]]  # numpy's S strips the trailing zeros


def open_xarray(path):
    """The cache as an xarray Dataset with coordinates: its class names on `class` and its decoded keys on
    `sample`, so `ds.probs.sel(sample="n01/img_3", **{"class": "dog"})` reads by name (`class` is a Python keyword:
    pass it as a dict); every array and attribute as `xr.open_zarr` gives them (lazy where dask is installed).
    Schema v3 and later (v1/v2 caches have no dimension names); needs the optional xarray package."""
    try:
        import xarray as xr
    except ImportError:
        raise CacheError("open_xarray needs xarray, an optional dependency: pip install xarray") from None
    path = Path(path)
    opened = TeacherCache.open(path)  # the schema checked, as every open of dho checks it
    if opened.attrs["schema_version"] < 3:
        raise CacheError(f"{path}: a schema v{opened.attrs['schema_version']} cache has no dimension names for xarray; "
                         "rebuild it with `dho precompute-teacher` (or read it with TeacherCache)")
    ds = xr.open_zarr(path, consolidated=False)
    return ds.assign_coords({"class": list(opened.attrs["classnames"]), "sample": opened.keys})


class TeacherCache:
    """A teacher cache opened for reading (`mode="r"`) or for adding units (`mode="r+"`)."""

    def __init__(self, path: Path, group, mode: str):
        self.path = path
        self.group = group
        self.mode = mode
        self.attrs: dict = dict(group.attrs)
        if self.attrs["schema_version"] == 1:  # v1 had one classifier: the re-normalised template mean
            self.attrs.setdefault("text_classifier_norm", "renormalize")
        self.base_attrs: dict = dict(self.attrs)  # the store's own attributes (`attrs` gets a selected member's on top)
        self.members: list[dict] = list(self.attrs.get("teachers") or [])  # [] for a single-teacher cache
        self.member: int | None = None  # the selected member of an ensemble (`select`); None = the mean
        self.num_views: int = self.attrs["num_views"]
        self.num_samples: int = self.attrs["num_samples"]
        self.classnames: list[str] = list(self.attrs["classnames"])
        self.num_classes = len(self.classnames)
        self.shard_counts: list[int] = list(self.attrs["shard_counts"])
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.shard_counts)]).astype(np.int64)  # (S + 1,)
        self.chunk_len: int = self.attrs["chunk_len"]
        self.topk: int | None = self.attrs["topk"]
        self.eta: float = float(self.attrs["eta"])
        self.shard_group: int = int(self.attrs.get("shard_group", 1))  # dataset shards per Zarr shard (v4; 1 before)
        # the augmented views training draws from, 0 .. train_views - 1: all but the optional center view (stored last)
        self.train_views: int = self.num_views - int(bool(self.attrs.get("center_view", False)))
        self._keys: list[str] | None = None
        self._labels: np.ndarray | None = None
        self._valid: np.ndarray | None = None
        self._done: np.ndarray | None = None
        self._arrays: dict = {}

    @property
    def prompt_names(self) -> str:
        """The rule that put the class names into this cache's prompts (`dho.cache.prompt_names`)."""
        return prompt_names(self.attrs)

    def array(self, name: str):
        """The zarr array `name` (opened once: each open reads its metadata file); with a member of an ensemble
        selected, its own arrays (MEMBER_ARRAYS) come from its subgroup."""
        name = self._resolve(name)
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _resolve(self, name: str) -> str:
        """The path of array `name` in the store: `teachers/<i>/name` for a selected member's own arrays."""
        if self.member is not None and name in MEMBER_ARRAYS:
            return f"{member_group(self.member)}/{name}"
        return name

    # ------------------------------------------------------------------ ensembles (schema v6)

    @property
    def augment(self) -> dict | None:
        """The strong augmentation of the random views (schema v7 attribute `augment`, `dho.data.augment`); None: crop and
        flip only (every cache before v7)."""
        return self.attrs.get("augment")

    @property
    def is_ensemble(self) -> bool:
        """Whether the store holds several teachers (`dho merge-caches`) and their mean."""
        return bool(self.members)

    @property
    def teacher_names(self) -> list[str]:
        """The members' names of an ensemble, [] for a single-teacher cache."""
        return [m["name"] for m in self.members]

    def member_index(self, teacher: str | int) -> int | None:
        """`teacher` (MEAN, a member's index as int or digits, or its name) -> the member's index, None for the mean;
        a CacheError naming the choices for anything else. A single-teacher cache has the mean only (its teacher)."""
        names = self.teacher_names
        choices = f"{MEAN}, " + ", ".join(f"{i} or {n}" for i, n in enumerate(names)) if names else MEAN
        if teacher == MEAN:
            return None
        if isinstance(teacher, int) or str(teacher).isdigit():
            if names and 0 <= int(teacher) < len(names):
                return int(teacher)
        elif teacher in names:
            return names.index(teacher)
        what = f"an ensemble of {len(names)} teachers" if names else "a single-teacher cache"
        raise CacheError(f"--teacher {teacher}: {self.path} is {what}; choose {choices}")

    def select(self, teacher: str | int) -> "TeacherCache":
        """Read member `teacher` of an ensemble (`member_index`), or the mean (MEAN): its probabilities, embeddings,
        text classifier and attributes (MEMBER_ATTRS on top of the store's). Returns self."""
        self.member = self.member_index(teacher)
        self.attrs = dict(self.base_attrs)
        if self.member is not None:
            self.attrs.update({k: self.members[self.member][k] for k in MEMBER_ATTRS})
        return self

    # ------------------------------------------------------------------ creating and opening

    @classmethod
    def create_or_open(cls, path, attrs: dict, keys: list[str], labels: np.ndarray, text_classifier: np.ndarray,
                       dataset=None) -> "TeacherCache":
        """Open `path` for writing if it exists with the same parameters, else create it atomically.

        Race-safe: each process builds the store in its own temporary folder and renames it into
        place; when another process won the race, its store is opened and checked instead.
        """
        path = Path(path)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # an empty folder made for the cache: the store is renamed into its place
        if not path.exists():
            cls._create(path, attrs, keys, labels, text_classifier)
        cache = cls.open(path, dataset=dataset, mode="r+")
        cache.check_params(attrs)
        return cache

    @classmethod
    def _create(cls, path: Path, attrs: dict, keys: list[str], labels: np.ndarray, text_classifier) -> None:
        """Create the empty store at `path` atomically; `text_classifier` is (C, D), or for an ensemble (attribute
        `teachers`, schema v6) one (C, D_i) per member."""
        key_matrix = encode_keys(keys)  # (N, W) uint8
        attrs = {
            "schema": SCHEMA_NAME, "schema_version": CURRENT_VERSION, "dho_version": dho.__version__,
            **attrs, "key_bytes": key_matrix.shape[1], "created_at": _now(),
        }
        attrs.setdefault("shard_group", shard_group(attrs["shard_counts"], attrs["chunk_len"], row_bytes(attrs)))
        attrs.pop("complete", None)
        try:
            jsonschema.validate(attrs, load_schema(CURRENT_VERSION))
        except jsonschema.ValidationError as e:
            raise CacheError(f"{path}: refusing to create a cache with invalid attributes ({_where(e)}: {e.message})") from e
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)  # folders of creators that were killed
        tmp = temp_sibling(path, "creating")
        try:
            group = zarr.open_group(str(tmp), mode="w-", attributes=attrs)
            members = attrs.get("teachers") or ()
            tables = [(group, expected_arrays(attrs))]
            if members:
                teachers = group.create_group("teachers", attributes={"names": [m["name"] for m in members]})
                tables += [(teachers.create_group(str(i), attributes={"name": m["name"]}), expected_arrays(attrs, i))
                           for i, m in enumerate(members)]
            for where, table in tables:
                for name, spec in table.items():
                    where.create_array(name, shape=spec["shape"], dtype=spec["dtype"], chunks=spec["chunks"], shards=spec["shards"],
                                       fill_value=spec["fill_value"], dimension_names=spec["dims"],
                                       compressors=[ZstdCodec(), Crc32cCodec()])  # every (inner) chunk checksummed
            group["keys"][:] = key_matrix
            group["labels"][:] = np.asarray(labels, dtype=np.int64)
            for where, classifier in zip([t for t, _ in tables[1:]] if members else [group],
                                         text_classifier if members else [text_classifier]):
                where["text_classifier"][:] = np.asarray(classifier, dtype=np.float32)
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    fsync(f)
            try:
                os.rename(tmp, path)  # atomic; fails if another process created `path` first
            except OSError:
                if not path.exists():
                    raise
            else:
                fsync(path.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def open(cls, path, dataset=None, mode: str = "r") -> "TeacherCache":
        """Open and validate a cache; with `dataset` (a dho.data.Dataset) also check it was built for it."""
        path = Path(path)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        if not (path / "zarr.json").is_file():
            raise CacheError(f"{path}: no teacher cache here (no zarr.json); create one with `dho precompute-teacher`")
        try:
            group = zarr.open_group(str(path), mode=mode)
        except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
            raise CacheError(f"{path}: not a readable Zarr v3 group ({e}); rebuild it with `dho precompute-teacher`") from e
        attrs = dict(group.attrs)
        if attrs.get("schema") != SCHEMA_NAME:
            raise CacheError(f"{path}: a Zarr group but not a dho teacher cache (attribute schema={attrs.get('schema')!r})")
        version = attrs.get("schema_version")
        if version not in KNOWN_VERSIONS:
            raise CacheError(
                f"{path}: cache schema version {version!r}, but dho {dho.__version__} reads version(s) "
                f"{', '.join(map(str, KNOWN_VERSIONS))}; use the dho version that wrote it (dho_version="
                f"{attrs.get('dho_version')!r}) or rebuild the cache with `dho precompute-teacher`"
            )
        try:
            jsonschema.validate(attrs, load_schema(version))
        except jsonschema.ValidationError as e:
            raise CacheError(
                f"{path}: attributes do not match cache schema v{version} at {_where(e)}: {e.message}; "
                "the cache is damaged or was written by another tool, rebuild it with `dho precompute-teacher`"
            ) from e
        _check_layout(path, group, attrs)
        cache = cls(path, group, mode)
        if dataset is not None:
            cache.check_dataset(dataset)
        return cache

    @classmethod
    def reopen(cls, path, done: np.ndarray, valid: np.ndarray, teacher: str | int = MEAN) -> "TeacherCache":
        """A read-only handle on a cache another process already opened and checked (a DataLoader
        worker's): reads the group attributes, then chunks only; `done` and `valid` are that process's
        arrays (no per-unit or per-sample read here)."""
        cache = cls(Path(path), zarr.open_group(str(path), mode="r"), "r").select(teacher)
        cache._done, cache._valid = done, valid
        return cache

    def check_dataset(self, dataset) -> None:
        """Raise CacheError saying what differs when this cache was not built for `dataset`."""
        a, fix = self.attrs, "use the cache built for this dataset, or build one with `dho precompute-teacher`"
        where = f"cache {self.path} does not belong to dataset {dataset.root}"
        mismatch = dataset_mismatch(a, dataset.classnames, dataset.num_samples, [s.count for s in dataset.shards])
        if mismatch is not None:
            raise CacheError(f"{where}: {mismatch}; {fix}")
        if dataset.fingerprint == a["dataset_fingerprint"]:
            # same content (the fingerprint covers keys, labels and shard checksums): no key is read. The stored
            # fingerprint stands for the columns: a v3 manifest's column files were checked (size, crc32) when the
            # dataset was opened, and every reader checks each sample's key and label against the shards
            return
        keys = self.keys
        if list(dataset.keys) != keys:
            i = next(i for i, (x, y) in enumerate(zip(keys, dataset.keys)) if x != y)
            raise CacheError(f"{where}: sample {i} has key {keys[i]!r} in the cache but {dataset.keys[i]!r} in the dataset; {fix}")
        if dataset.fingerprint != a["dataset_fingerprint"]:
            raise CacheError(
                f"{where}: dataset fingerprint {dataset.fingerprint[:12]}... differs from the cache's "
                f"{a['dataset_fingerprint'][:12]}... (same keys, but labels or shard contents changed); {fix}"
            )

    def check_params(self, attrs: dict) -> None:
        """Raise CacheError listing every parameter in which `attrs` differs from this store (`shard_group`:
        only when `attrs` sets one; it fixes the file layout, not the numbers; `teacher.prompt_names`: only while
        the store is incomplete, as a complete one gets nothing written that could mix)."""
        diffs = []
        complete = self.is_complete()
        if attrs.get("shard_group") is not None and attrs["shard_group"] != self.shard_group:
            diffs.append(f"shard_group: {self.shard_group} in the cache vs {attrs['shard_group']} now (leave --shard-group out to resume)")
        for k in PARAM_KEYS:
            mine, theirs = self.attrs.get(k), attrs.get(k)
            if k == "teacher" and isinstance(mine, dict) and isinstance(theirs, dict):  # compared as rules in effect
                mine = {**mine, "prompt_names": prompt_names(self.attrs)}
                theirs = {**theirs, "prompt_names": prompt_names({**self.attrs, **attrs})}
            if k == "preprocess":
                mine = {x: y for x, y in (mine or {}).items() if x != "source"}
                theirs = {x: y for x, y in (theirs or {}).items() if x != "source"}
            if isinstance(mine, dict) and isinstance(theirs, dict):  # name the differing fields
                pairs = [(f"{k}.{x}", mine.get(x), theirs.get(x)) for x in sorted(set(mine) | set(theirs))]
            else:
                pairs = [(k, mine, theirs)]
            for name, a, b in pairs:
                if name == "teacher.prompt_names" and complete:
                    continue
                if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                    diffs.append(f"{name}: {_short(a)} in the cache vs {_short(b)} now")
                    if name == "teacher.prompt_names":
                        diffs[-1] += " (an older dho put the class names with '_' into the prompts as given: rebuild it)"
        if diffs:
            raise CacheError(
                f"{self.path} was built with other parameters ({'; '.join(diffs)}); the cache never mixes "
                "settings: re-run with the cache's settings to resume it, or write to a new --out"
            )

    # ------------------------------------------------------------------ reading

    @property
    def keys(self) -> list[str]:
        """N sample keys in global row order (v3 stores them as (N, W) uint8 UTF-8, v1/v2 as strings)."""
        if self._keys is None:
            raw = self._read_whole("keys")
            self._keys = decode_keys(raw) if self.attrs["schema_version"] >= 3 else [str(k) for k in raw]
        return self._keys

    def key(self, row: int) -> str:
        """The key of global row `row` (reads one chunk of `keys`, not all of them)."""
        if self._keys is not None:
            return self._keys[row]
        arr = self.array("keys")
        raw = self._load("keys", row, lambda: self._chunk_where("keys", (row // arr.chunks[0],) + (0,) * (arr.ndim - 1)))
        return decode_keys(np.asarray(raw).reshape(1, -1))[0] if self.attrs["schema_version"] >= 3 else str(raw)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64, -1 = unlabeled."""
        if self._labels is None:
            self._labels = np.asarray(self._read_whole("labels"), dtype=np.int64)
        return self._labels

    @property
    def valid(self) -> np.ndarray:
        """(N,) bool: False for samples skipped as unreadable (NaN rows) and for samples of shards not started.

        Schema v2 stores every chunk, so a shard with a finished unit must have its `valid` chunks: a
        missing one would read as "all unreadable" and silently drop the shard from training."""
        if self._valid is None:
            if self.attrs["schema_version"] >= 2:
                seen: set = set()  # in v4 a chunk of `valid` spans a group of shards: stat each file once
                for shard in np.flatnonzero(self.done.any(axis=0)):
                    files = [f for f in self._unit_chunk_files("valid", 0, int(shard)) if f not in seen]
                    seen.update(files)
                    missing = [f for f in files if not f.is_file()]
                    if missing:
                        start, stop = self.shard_range(int(shard))
                        raise CacheError(f"{self.path}: array 'valid', {self._where(None, start, stop)}: the chunk file "
                                         f"{missing[0].relative_to(self.path)} is missing; rebuild the cache with "
                                         "`dho precompute-teacher` into a new --out")
            self._valid = np.asarray(self._read_whole("valid", files=False), dtype=bool)  # the files were checked above
        return self._valid

    @property
    def done(self) -> np.ndarray:
        """(V, S) bool: which (view, shard) units are complete (as of opening or the last `refresh()`)."""
        if self._done is None:
            if self.attrs["schema_version"] >= 4 and self.attrs.get("complete", False):
                # finalised: every unit is done (set only after all of them were), no flag is read
                self._done = np.ones((self.num_views, len(self.shard_counts)), dtype=bool)
            else:
                self._done = np.asarray(self._read_whole("done", files=False), dtype=bool)  # not all stored before completion
        return self._done

    def refresh(self) -> None:
        """Forget what was read of `done`, `valid` and `complete` (other processes may have written units since)."""
        self._done, self._valid = None, None
        self.attrs["complete"] = bool(zarr.open_group(str(self.path), mode="r").attrs.get("complete", False))

    @property
    def has_embeddings(self) -> bool:
        """Whether the store holds the teacher's image embeddings (`precompute --store-embeddings`); of an ensemble,
        the selected member's (the mean has none)."""
        if self.is_ensemble:
            return self.member is not None and bool(self.members[self.member]["store_embeddings"])
        return "embeddings" in self.group

    @property
    def text_classifier(self) -> np.ndarray:
        """(C, D) float32 zero-shot classifier of the teacher (unit rows unless text_classifier_norm is "mean");
        of an ensemble, the selected member's (the mean has none)."""
        if self.is_ensemble and self.member is None:
            raise CacheError(f"{self.path} is an ensemble of {', '.join(self.teacher_names)}: their mean has no text "
                             "classifier; select one teacher (`dho distill --teacher NAME`)")
        return np.asarray(self._read_whole("text_classifier"), dtype=np.float32)

    def is_complete(self) -> bool:
        """True when every unit is done and the store was finalised (attribute complete=True)."""
        return bool(self.attrs.get("complete", False)) and bool(self.done.all())

    def shard_owner(self, shard: int) -> int:
        """The writing group of dataset shard `shard`: shards of one group share Zarr shards (and chunks of
        `valid` and `done`), so one process must write all of them (`precompute` gives ranks whole groups)."""
        return shard // self.shard_group

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Global rows [start, stop) of dataset shard `shard`."""
        return int(self.shard_offsets[shard]), int(self.shard_offsets[shard + 1])

    def _check_read(self, view: int, start: int, stop: int) -> None:
        if not 0 <= view < self.num_views:
            raise CacheError(f"{self.path}: view {view} out of range (the cache has {self.num_views} views)")
        if not 0 <= start <= stop <= self.num_samples:
            raise CacheError(f"{self.path}: rows [{start}, {stop}) out of range (the cache has {self.num_samples} samples)")
        if stop == start:
            return
        first = int(np.searchsorted(self.shard_offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.shard_offsets, stop - 1, side="right")) - 1
        for s in range(first, last + 1):
            if not self.done[view, s]:
                raise CacheError(
                    f"{self.path}: view {view} of shard {s} (rows {self.shard_range(s)}) is not computed yet; "
                    "re-run the same `dho precompute-teacher` command to finish the cache"
                )

    def _where(self, view: int | None, start: int, stop: int) -> str:
        shard = int(np.searchsorted(self.shard_offsets, start, side="right")) - 1
        chunk = start // self.chunk_len
        return (f"{'' if view is None else f'view {view}, '}shard {shard} (rows {start}-{stop - 1}, chunk {chunk})")

    def _read(self, name: str, view: int | None, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of array `name` (of one view); a failed checksum is a CacheError naming the chunk."""
        return self._load(name, slice(start, stop) if view is None else (view, slice(start, stop)),
                          lambda: self._where(view, start, stop))

    def _load(self, name: str, selection, where) -> np.ndarray:
        """`array(name)[selection]`: every zarr read of chunks goes through here, so a chunk that fails its
        checksum or cannot be decoded is a one-line CacheError naming the array and `where()` (the chunk)."""
        try:
            return self.array(name)[selection]
        except (ValueError, RuntimeError, OSError, EOFError) as e:
            what = ("is damaged (its checksum does not match the data)" if "checksum" in str(e)
                    else f"cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
            raise CacheError(f"{self.path}: array {name!r}, {where()} {what}; {REBUILD}") from None

    def _chunk_where(self, name: str, coords: tuple) -> str:
        """Chunk `coords` of a whole array (not per view): its file and, along the samples, its rows."""
        arr = self.array(name)
        rel = f"{self._resolve(name)}/{arr.metadata.encode_chunk_key(coords)}"
        if name in ("keys", "labels", "valid"):
            start = coords[0] * arr.chunks[0]
            return f"chunk {coords[0]} (rows {start}-{min(start + arr.chunks[0], arr.shape[0]) - 1}, file {rel})"
        return f"chunk {coords} (file {rel})"

    def _read_whole(self, name: str, files: bool = True, keep: bool = True) -> np.ndarray | None:
        """Array `name` (one of WHOLE_ARRAYS), read in blocks of whole chunks along its first axis; `files`: every
        chunk file must exist (schema v2 stores every chunk, so a missing one is damage, not fill values);
        `keep=False` only checks (each block is dropped once read)."""
        arr = self.array(name)
        grid = arr.cdata_shape  # chunks per axis (these arrays are not in Zarr shards: a chunk is a file)
        if files and self.attrs["schema_version"] >= 2:
            for coords in np.ndindex(*grid):
                if not (self.path / self._resolve(name) / arr.metadata.encode_chunk_key(coords)).is_file():
                    raise CacheError(f"{self.path}: array {name!r}, {self._chunk_where(name, coords)}: the chunk file is "
                                     f"missing; {REBUILD}")
        rows = arr.chunks[0]
        row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
        step = max(1, READ_BLOCK_BYTES // max(1, rows * row_bytes)) * rows  # whole chunks
        blocks = []
        for start in range(0, arr.shape[0], step):
            stop = min(start + step, arr.shape[0])
            try:
                block = self._load(name, slice(start, stop), lambda: f"rows {start}-{stop - 1}")
            except CacheError:
                self._find_damaged_chunk(name, start // rows, -(-stop // rows))
                raise
            if keep:
                blocks.append(block)
        if not keep:
            return None
        return np.concatenate(blocks) if blocks else arr[:]

    def _find_damaged_chunk(self, name: str, first: int, last: int) -> None:
        """Raise the CacheError of the first chunk of rows-chunks [first, last) of a whole array that fails to read."""
        arr = self.array(name)
        for coords in np.ndindex(last - first, *arr.cdata_shape[1:]):
            coords = (first + coords[0], *coords[1:])
            sel = tuple(slice(c * n, (c + 1) * n) for c, n in zip(coords, arr.chunks))
            self._load(name, sel, lambda: self._chunk_where(name, coords))

    def _damaged(self, name: str, view: int, start: int, stop: int, row: int, what: str) -> CacheError:
        key = self.key(start + row)
        return CacheError(f"{self.path}: array {name!r}, {self._where(view, start, stop)}: sample {key!r} {what}; the chunk "
                          "is damaged or missing: rebuild the cache with `dho precompute-teacher` into a new --out")

    def probs(self, view: int, start: int, stop: int, eta: float | None = None) -> np.ndarray:
        """Teacher probabilities softmax(cos / (zeta * eta)) of rows [start, stop) -> float32 (n, C).

        Top-k caches are densified: the stored K values, and the remainder mass 1 - sum(top-k)
        (clipped at 0) spread uniformly over the other C - K classes. With `eta` != the cache's
        eta the rows are re-tempered exactly: p' = p^(eta_cache / eta) / sum (for top-k caches,
        of the densified rows). Invalid (unreadable) samples come back as NaN rows.
        A shard-aligned [start, stop) of one view is one chunk read.
        """
        self._check_read(view, start, stop)
        valid = self.valid[start:stop]  # (n,)
        if self.is_ensemble and self.member is None and eta is not None and float(eta) != self.eta:
            # the mean at another eta is the mean of the members re-tempered, each exactly (not the stored mean re-tempered)
            members = [self.members_probs(i, view, start, stop, eta) for i in range(len(self.members))]
            return np.mean(members, axis=0, dtype=np.float64).astype(np.float32)  # (n, C)
        if self.topk is None:
            p = np.asarray(self._read("probs", view, start, stop), dtype=np.float32)  # (n, C)
            self._check_distribution("probs", view, start, stop, p, valid, exact_sum=True)
        else:
            p = densify_topk(*self.topk_rows(view, start, stop), self.num_classes)
        if eta is not None and float(eta) != self.eta:
            p = retemper(p, self.eta / float(eta))
        return p

    def members_probs(self, member: int, view: int, start: int, stop: int, eta: float | None = None) -> np.ndarray:
        """(n, C) float32 probabilities of member `member` of an ensemble, whatever is selected (`probs` of it)."""
        selected = self.member
        self.member = member
        try:
            return self.probs(view, start, stop, eta=eta)
        finally:
            self.member = selected

    def topk_rows(self, view: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """A top-k cache's rows [start, stop) as stored, checked: indices (n, K) int64, probabilities (n, K)
        float32 (at the cache's eta; NaN / -1 rows for invalid samples). Readers that keep them sparse
        densify later (`densify_topk`, also on the device as torch tensors)."""
        if self.topk is None:
            raise CacheError(f"{self.path} stores dense probabilities, not top-k rows")
        self._check_read(view, start, stop)
        valid = self.valid[start:stop]  # (n,)
        idx = np.asarray(self._read("topk_indices", view, start, stop), dtype=np.int64)  # (n, K)
        val = np.asarray(self._read("topk_probs", view, start, stop), dtype=np.float32)  # (n, K)
        self._check_distribution("topk_probs", view, start, stop, val, valid, exact_sum=False)
        bad = np.flatnonzero(valid & ((idx < 0) | (idx >= self.num_classes)).any(axis=1))
        if len(bad):
            raise self._damaged("topk_indices", view, start, stop, int(bad[0]), f"has class indices outside [0, {self.num_classes})")
        return idx, val

    def _check_distribution(self, name: str, view: int, start: int, stop: int, p: np.ndarray, valid: np.ndarray,
                            exact_sum: bool) -> None:
        """Rows of valid samples must be distributions: finite, non-negative, summing to 1 (top-k: at most 1)."""
        sums = p.sum(axis=1)  # (n,)
        ok = np.isfinite(p).all(axis=1) & (p >= 0).all(axis=1)
        ok &= (np.abs(sums - 1.0) <= SUM_TOLERANCE) if exact_sum else (sums <= 1.0 + SUM_TOLERANCE)
        bad = np.flatnonzero(valid & ~ok)
        if len(bad):
            row = p[bad[0]]
            raise self._damaged(name, view, start, stop, int(bad[0]),
                                f"has teacher probabilities that are not a distribution (sum {float(np.sum(row)):.4g}, "
                                f"min {float(np.min(row)):.4g}, max {float(np.max(row)):.4g})")

    def view_params(self, view: int, start: int, stop: int) -> np.ndarray:
        """(n, 5) int32 rows (top, left, height, width, flip) of the boxes the teacher saw; -1 rows for invalid samples."""
        self._check_read(view, start, stop)
        params = np.asarray(self._read("view_params", view, start, stop), dtype=np.int32)  # (n, 5)
        ok = (params[:, :2] >= 0).all(axis=1) & (params[:, 2:4] > 0).all(axis=1) & np.isin(params[:, 4], (0, 1))
        bad = np.flatnonzero(self.valid[start:stop] & ~ok)
        if len(bad):
            raise self._damaged("view_params", view, start, stop, int(bad[0]), f"has no crop box ({params[bad[0]].tolist()})")
        return params

    def embeddings(self, view: int, start: int, stop: int) -> np.ndarray:
        """(n, D) float32 L2-normalised teacher image embeddings (stored as float16; needs --store-embeddings)."""
        if not self.has_embeddings:
            raise CacheError(f"{self.path} holds no teacher embeddings; rebuild it with `dho precompute-teacher --store-embeddings`")
        self._check_read(view, start, stop)
        emb = np.asarray(self._read("embeddings", view, start, stop), dtype=np.float32)  # (n, D)
        bad = np.flatnonzero(self.valid[start:stop] & ~np.isfinite(emb).all(axis=1))
        if len(bad):
            raise self._damaged("embeddings", view, start, stop, int(bad[0]), "has no finite embedding")
        return emb

    def verify(self) -> list[str]:
        """`verify_arrays()` then `verify_units()`: every chunk of the store that holds data -> one line per damaged
        array or unit (the units are not read when `valid`, which every unit read checks against, is damaged)."""
        problems = self.verify_arrays()
        if any("array 'valid'" in p for p in problems):
            return problems
        return problems + self.verify_units()

    def verify_arrays(self) -> list[str]:
        """`_verify_arrays` of the store, whichever member is selected (an ensemble's members are all read)."""
        selected = self.member
        try:
            return self._verify_arrays()
        finally:
            self.select(MEAN if selected is None else selected)

    def _verify_arrays(self) -> list[str]:
        """Read every chunk of the arrays that are not per view (WHOLE_ARRAYS: checksums, missing chunk files);
        `done` itself also for a complete cache, whose flags are otherwise taken as read -> one line per damaged
        array. Small (O(N) bytes): `dho distill` checks them when it opens a cache (`check_arrays`)."""
        problems = []
        for name in WHOLE_ARRAYS:
            try:
                if name == "done":
                    complete = bool(self.attrs.get("complete", False))
                    done = self._read_whole("done", files=complete)  # every flag of a finished cache is stored
                    if complete and not done.all():
                        view, shard = map(int, np.argwhere(done == 0)[0])
                        raise CacheError(f"{self.path}: array 'done': the cache is marked complete but unit (view {view}, "
                                         f"shard {shard}) is not done; {REBUILD}")
                elif name == "valid":
                    self._valid = None  # re-read: checks the chunk files of every started shard
                    _ = self.valid
                elif name == "text_classifier" and self.is_ensemble:  # each member has its own
                    for i in range(len(self.members)):
                        self.select(i)._read_whole(name, keep=False)
                else:
                    self._read_whole(name, keep=False)
            except CacheError as e:
                problems.append(str(e))
        return problems

    def check_arrays(self) -> None:
        """Raise the first problem `verify_arrays` finds (what `dho distill` runs on every cache it opens)."""
        problems = self.verify_arrays()
        if problems:
            raise CacheError(problems[0])

    def verify_units(self) -> list[str]:
        """Read every chunk of every finished unit (checksums, missing chunks, row checks) -> one line per damaged unit."""
        problems = []
        done = self.done
        for shard in range(len(self.shard_counts)):
            start, stop = self.shard_range(shard)
            for view in np.flatnonzero(done[:, shard]):
                try:
                    self.probs(int(view), start, stop)
                    self.view_params(int(view), start, stop)
                    if self.has_embeddings:
                        self.embeddings(int(view), start, stop)
                    for i, member in enumerate(self.members):  # an ensemble: every member's own arrays too
                        self.members_probs(i, int(view), start, stop)
                        if member["store_embeddings"]:
                            self.member, selected = i, self.member
                            try:
                                self.embeddings(int(view), start, stop)
                            finally:
                                self.member = selected
                except CacheError as e:
                    problems.append(str(e))
        return problems

    # ------------------------------------------------------------------ writing (one process per unit)

    def _unit_chunk_files(self, name: str, view: int, shard: int) -> list[Path]:
        """Files (chunks, or Zarr shards in v4) of array `name` covered by unit (view, shard); `valid` is per
        shard (view ignored)."""
        arr = self.array(name)
        start, stop = self.shard_range(shard)
        rows_per_file = arr.metadata.chunk_grid.chunk_shape[1 if arr.ndim == 3 else 0]  # the shard shape when sharded
        rows = range(start // rows_per_file, (stop - 1) // rows_per_file + 1)
        coords = [(j,) if arr.ndim == 1 else (view, j, 0) for j in rows]
        return [self.path / self._resolve(name) / arr.metadata.encode_chunk_key(c) for c in coords]

    def _clean_and_sync(self, names: list[str], view: int, shard: int, sync: bool) -> None:
        """Delete stray `*.partial` temp files of a killed writer in these chunks, or fsync the chunks."""
        dirs = set()
        for name in names:
            for f in self._unit_chunk_files(name, view, shard):
                if not sync:
                    for stray in f.parent.glob(f"{f.name}.*.partial"):
                        stray.unlink(missing_ok=True)
                elif f.exists():  # an all-fill-value chunk is not stored
                    fsync(f)
                    dirs.add(f.parent)
        for d in dirs:
            fsync(d)

    def write_valid(self, shard: int, valid: np.ndarray) -> None:
        """valid[rows of shard] (whole chunks of this shard only); call before any unit of the shard is marked done."""
        start, stop = self.shard_range(shard)
        self._clean_and_sync(["valid"], 0, shard, sync=False)
        self.array("valid")[start:stop] = np.asarray(valid, dtype=bool)
        self._clean_and_sync(["valid"], 0, shard, sync=True)
        self._valid = None

    def write_unit(self, view: int, shard: int, *, view_params: np.ndarray, probs: np.ndarray | None = None,
                   topk_indices: np.ndarray | None = None, topk_probs: np.ndarray | None = None,
                   embeddings: np.ndarray | None = None, members: list[dict] | None = None) -> None:
        """Write and fsync all data of unit (view, shard): rows of the shard, whole chunks; then mark it done. An
        ensemble (schema v6): `probs` is the mean and `members` one dict per member of its own `probs` (and
        `embeddings`), all written before the unit is marked done."""
        if self.mode != "r+":
            raise CacheError(f"{self.path} is open read-only")
        start, stop = self.shard_range(shard)
        data = {"view_params": np.asarray(view_params, dtype=np.int32)}
        if self.topk is None:
            data["probs"] = np.asarray(probs, dtype=np.float16)
        else:
            data["topk_indices"] = np.asarray(topk_indices, dtype=np.int32)
            data["topk_probs"] = np.asarray(topk_probs, dtype=np.float16)
        if self.attrs["store_embeddings"]:
            data["embeddings"] = np.asarray(embeddings, dtype=np.float16)
        for i, own in enumerate(members or ()):
            data[f"{member_group(i)}/probs"] = np.asarray(own["probs"], dtype=np.float16)
            if self.members[i]["store_embeddings"]:
                data[f"{member_group(i)}/embeddings"] = np.asarray(own["embeddings"], dtype=np.float16)
        if len(members or ()) != len(self.members):
            raise ValueError(f"unit ({view}, {shard}) of an ensemble of {len(self.members)} needs one `members` entry each")
        for name, values in data.items():
            if values.shape[0] != stop - start:
                raise ValueError(f"{name} for shard {shard} has {values.shape[0]} rows, expected {stop - start}")
        self._clean_and_sync(list(data), view, shard, sync=False)
        for name, values in data.items():
            self.array(name)[view, start:stop] = values
        self._clean_and_sync(list(data), view, shard, sync=True)
        # the completion flag goes last, in its own chunk, and is itself made durable
        self.array("done")[view, shard] = 1
        self._fsync_done(view, shard)
        if self._done is not None:
            self._done[view, shard] = True

    def _fsync_done(self, view: int, shard: int) -> None:
        rows, cols = self.array("done").metadata.chunk_grid.chunk_shape
        f = self.path / "done" / self.array("done").metadata.encode_chunk_key((view // rows, shard // cols))
        fsync(f)
        fsync(f.parent)

    def finalize(self) -> bool:
        """Set attribute complete=True if every unit is done; returns whether the cache is complete."""
        self.refresh()
        if not self.done.all():
            return False
        if not self.group.attrs.get("complete", False):
            self.group.attrs.update({"complete": True})
            fsync(self.path / "zarr.json")
            self.attrs["complete"] = True
        return True


def densify_topk(indices, values, num_classes: int):
    """(n, K) top-k indices / probs -> (n, C) float32: the top-k kept, the remainder max(0, 1 - sum) spread
    uniformly over the other C - K classes. numpy arrays (the reader; a NaN row of an invalid sample stays
    NaN) or torch tensors on any device (the training loop's targets: indices int64, values float32)."""
    rest = num_classes - values.shape[1]
    if not isinstance(values, np.ndarray):  # a torch tensor (torch imported here only: readers need no torch)
        import torch

        remainder = (1.0 - values.sum(dim=1, keepdim=True)).clamp_min(0.0)  # (n, 1)
        fill = remainder / rest if rest > 0 else torch.zeros_like(remainder)
        dense = fill.expand(-1, num_classes).clone()  # (n, C)
        return dense.scatter_(1, indices, values)
    remainder = np.clip(1.0 - values.sum(axis=1, keepdims=True), 0.0, None)  # (n, 1); NaN rows stay NaN
    fill = remainder / rest if rest > 0 else np.zeros_like(remainder)
    dense = np.repeat(fill, num_classes, axis=1).astype(np.float32)  # (n, C)
    rows = np.flatnonzero(~np.isnan(values).any(axis=1))  # invalid samples keep their NaN row
    dense[rows[:, None], indices[rows]] = values[rows]
    return dense


def retemper(p, power: float):
    """p' = p^power / sum, float32: the exact re-tempering of softmax(l / eta) to softmax(l / eta'), power =
    eta / eta' (power 1: p itself). In float64 log space; zero probabilities stay zero. numpy arrays or torch
    tensors on any device."""
    if power == 1.0:
        return p
    if not isinstance(p, np.ndarray):  # a torch tensor
        import torch

        logp = torch.log(p.double()) * power  # (n, C), -inf where p == 0
        logp = logp - logp.masked_fill(~torch.isfinite(logp), -torch.inf).amax(dim=1, keepdim=True)
        q = torch.exp(logp)
        return (q / q.sum(dim=1, keepdim=True)).float()
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(p.astype(np.float64)) * power  # (n, C), -inf where p == 0
        logp -= np.nanmax(np.where(np.isfinite(logp), logp, -np.inf), axis=1, keepdims=True)
        q = np.exp(logp)
        q /= q.sum(axis=1, keepdims=True)
    return q.astype(np.float32)


def _where(e: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in e.absolute_path) or "(top level)"


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def _check_layout(path: Path, group, attrs: dict) -> None:
    """Every array of the schema's table exists with its dtype, shape, chunks and (v3) dimension names; of an
    ensemble (v6) also every member's own arrays, in its subgroup."""
    _check_table(path, group, attrs, expected_arrays(attrs), "")
    for i in range(len(attrs.get("teachers") or ())):
        try:
            sub = group[member_group(i)]
        except (KeyError, ValueError, TypeError, OSError):
            raise CacheError(f"{path}: the group {member_group(i)} of teacher {i} of the ensemble is missing; {REBUILD}") from None
        _check_table(path, sub, attrs, expected_arrays(attrs, i), f"{member_group(i)}/")


def _check_table(path: Path, group, attrs: dict, expected: dict, prefix: str) -> None:
    present = set(group.array_keys())
    for bare, spec in expected.items():
        name = prefix + bare
        if bare not in present:
            raise CacheError(f"{path}: array {name!r} required by cache schema v{attrs['schema_version']} is missing; rebuild the cache")
        try:
            arr = group[bare]
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise CacheError(f"{path}: array {name!r} has unreadable metadata ({name}/zarr.json: {type(e).__name__}); {REBUILD}") from None
        dtype = arr.metadata.data_type.to_json(zarr_format=3)
        symbolic = "(" + ", ".join(map(str, spec["symbols"])) + ")"
        shards = None if arr.shards is None else tuple(arr.shards)
        if dtype != spec["dtype"] or tuple(arr.shape) != spec["shape"] or tuple(arr.chunks) != spec["chunks"] or shards != spec["shards"]:
            raise CacheError(
                f"{path}: array {name!r} is {dtype} {tuple(arr.shape)} in chunks {tuple(arr.chunks)} (shards {shards}), but schema "
                f"v{attrs['schema_version']} requires {spec['dtype']} {symbolic} = {spec['shape']} in chunks {spec['chunks']} "
                f"(shards {spec['shards']}); rebuild the cache"
            )
        if spec["dims"] is not None and tuple(arr.metadata.dimension_names or ()) != spec["dims"]:
            raise CacheError(
                f"{path}: array {name!r} has dimension names {arr.metadata.dimension_names}, but schema "
                f"v{attrs['schema_version']} requires {spec['dims']}; rebuild the cache with `dho precompute-teacher`"
            )
    if attrs["schema_version"] >= 2:  # v2 checksums every chunk; a store without them was not written by dho
        for bare in expected:
            codecs = group[bare].metadata.codecs
            if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):  # v4: the inner chunks' codecs
                codecs = codecs[0].codecs
            if not any(isinstance(c, Crc32cCodec) for c in codecs):
                raise CacheError(f"{path}: array {prefix + bare!r} has no crc32c checksum codec, which cache schema "
                                 f"v{attrs['schema_version']} requires; rebuild the cache with `dho precompute-teacher`")
    extra = present - set(expected)
    if extra:
        raise CacheError(f"{path}: unexpected arrays {sorted(prefix + e for e in extra)} for these attributes (topk / "
                         "store_embeddings); rebuild the cache")
