"""`index`: a manifest for existing webdataset shards (local files or `pipe:` URLs), without decoding images.

Every shard is read once, streamed (`scan_and_hash`): its member names and label members give the keys
and labels, its members the per-sample digests (`sample_digest`), its bytes the sha256 and size, and a
local uncompressed tar the byte span of each sample; several
shards are scanned in a process pool (`scan_shards`). Out of scope: checking that the images decode
(`prepare` does; `index` only checks that every sample has an image member).
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence, Union

import numpy as np

import dho
from dho.data.classes import read_class_file, read_class_list
from dho.data.manifest import (MANIFEST, Columns, Dataset, dataset_entries, encode_strings, fingerprint_chunks,
                               first_duplicate, make_manifest, write_manifest)
from dho.data.pool import pool_map
from dho.data.reader import IMAGE_EXTS
from dho.data.shards import FILE, PIPE, PathLike, expand_braces, is_url, member_key, open_shard, sample_digest
from dho.data.shards import pipe_timeout as resolve_pipe_timeout
from dho.errors import DatasetError

# what `index` suggests for a URL given without pipe: (webdataset itself runs curl for http and https)
URL_COMMANDS = {"http": "curl -sfL {}", "https": "curl -sfL {}", "s3": "aws s3 cp {} -", "gs": "gcloud storage cat {}"}


class _HashedReads:
    """A binary stream that hashes (sha256) what is read from it: a shard is scanned and hashed in one read."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.sha256, self.size = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        self.size += len(data)
        return data


class _LastRead:
    """tarfile's stream, keeping the bytes of its last read: when iteration stops, the block that ended it."""

    def __init__(self, stream):
        self.stream, self.last = stream, b""

    def read(self, size=None) -> bytes:
        self.last = self.stream.read(size)
        return self.last

    def __getattr__(self, name):
        return getattr(self.stream, name)


def scan_and_hash(path: Union[Path, str], label_key: str, pipe_timeout: Optional[float] = None) -> dict:
    """{keys, labels, sha256, spans, digests, size} of a tar shard (file or `pipe:` URL), in one streamed read:
    keys and labels from member names (+ the small label members; no image decode), each sample's
    `sample_digest` of its members, the sha256 and size of the shard's bytes, and each sample's byte span
    [start, end) (its members' headers and padded data) when the shard is an uncompressed local file, else None."""
    keys: list[str] = []
    labels: list[int] = []
    has_image: list[bool] = []
    spans: list[list[int]] = []
    digests: list[int] = []
    members: dict = {}  # the current sample's members (ext -> bytes), for its digest
    in_shard: set = set()  # the keys seen in this shard
    try:
        with open_shard(path, pipe_timeout) as stream, tarfile.open(fileobj=(f := _HashedReads(stream)), mode="r|*") as tf:
            seekable = not is_url(path) and getattr(tf.fileobj, "comptype", None) == "tar"  # offsets are file offsets
            tf.fileobj = _LastRead(tf.fileobj)
            for ti in tf:
                tf.members = []  # streaming: keep no member list
                if not ti.isreg():
                    continue
                key, ext = member_key(ti.name)
                if key is None:
                    continue
                ext = ext.lower()
                end = ti.offset_data + -(-ti.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not keys or keys[-1] != key:
                    if key in in_shard:  # webdataset groups a sample's members only where they are adjacent
                        raise DatasetError(f"shard {path}: the members of sample {key!r} are not adjacent ({ti.name!r} comes "
                                           f"after members of {keys[-1]!r}); a sample's members must follow one another: "
                                           "write the shard with each sample's members together")
                    in_shard.add(key)
                    if keys:
                        digests.append(sample_digest(members))
                    keys.append(key)
                    labels.append(-1)
                    has_image.append(False)
                    spans.append([ti.offset, end])
                    members = {}
                spans[-1][1] = end
                raw = members[ext] = tf.extractfile(ti).read()
                if ext == label_key:
                    try:
                        labels[-1] = int(raw.strip())
                    except ValueError:
                        raise DatasetError(f"shard {path}: sample {key!r} has label member {ti.name!r} = {raw[:20]!r}, not an integer; fix the shard or pass another --label-key") from None
                elif ext in IMAGE_EXTS:
                    has_image[-1] = True
            # tarfile reads a tar cut inside a header or a member as a shorter, valid one; a complete tar ends
            # with two zero blocks after its last member: the block that ended the iteration and the next one
            # (an empty archive: its first block, read when it was opened, ended it)
            ended = tf.fileobj.last if tf.offset > 0 else b"\0" * tarfile.BLOCKSIZE
            tail = ended + tf.fileobj.read(tarfile.BLOCKSIZE)
            if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
                last = f" after sample {keys[-1]!r}" if keys else ""
                raise DatasetError(f"shard {path}: truncated{last} (no end-of-archive marker where the tar should end); "
                                   "copy it again or re-create it")
            if keys:
                digests.append(sample_digest(members))
            while f.read(1 << 20):  # the rest of the bytes (padding), for the hash
                pass
    except (tarfile.TarError, EOFError) as e:
        raise DatasetError(f"shard {path}: not a readable tar file ({e}); check or re-create it") from e
    for key, ok in zip(keys, has_image):
        if not ok:
            raise DatasetError(f"shard {path}: sample {key!r} has no image member ({', '.join(IMAGE_EXTS)}); fix the shard")
    return {"keys": keys, "labels": labels, "sha256": f.sha256.hexdigest(), "spans": spans if seekable else None,
            "digests": digests, "size": f.size}


def scan_shards(paths: Sequence[Union[Path, str]], label_key: str, processes: Optional[int] = None,
                pipe_timeout: Optional[float] = None) -> Iterator[dict]:
    """`scan_and_hash` of every shard, in order; shards are scanned in a process pool (one per core)
    when there are several, as tar parsing and hashing are CPU-bound."""
    yield from pool_map(scan_and_hash, [(p, label_key, pipe_timeout) for p in paths], processes)


def _shard_source(shard: PathLike) -> Union[Path, str]:
    """A shard argument of `index`: a `pipe:` URL as it is, else the resolved path of an existing local file."""
    if is_url(shard):
        if not shard[len(PIPE):].strip():
            raise DatasetError(f"shard {shard!r}: no command after pipe:; write pipe:COMMAND, a command that prints the tar")
        return shard
    if isinstance(shard, str) and shard.startswith(FILE):
        shard = shard[len(FILE):]
    elif isinstance(shard, str) and (scheme := re.match(r"^([A-Za-z][A-Za-z0-9+.-]+)://", shard)):
        command = URL_COMMANDS.get(scheme.group(1).lower(), "COMMAND {}").format(shard)
        raise DatasetError(f"shard {shard}: {scheme.group(1)}:// URLs are read through a command that prints the shard, "
                           f"as webdataset reads them: give 'pipe:{command}'")
    if not Path(shard).is_file():
        raise DatasetError(f"shard {shard} not found; check the path")
    return Path(shard).resolve()


def index(shards: Sequence[PathLike], classnames_file: PathLike, out: PathLike, label_key: str = "cls", overwrite: bool = False,
          classes_of: Optional[PathLike] = None, processes: Optional[int] = None, pipe_timeout: Optional[float] = None) -> Dataset:
    """Write OUT/manifest.json for existing webdataset shards (given order = global order).

    A shard given as a str is spelled as webdataset spells it: brace ranges and lists are expanded
    (`expand_braces`), `pipe:COMMAND` is read from the command's stdout (recorded as the URL itself;
    a relative path in the command is relative to the working directory of whoever reads the dataset),
    `file:PATH` is a local file; a Path is a local file as it is. Local shards are recorded relative to
    OUT when they lie below it, else absolute. The class names file has one class per line, `NAME` or `ID<TAB>NAME` (ids recorded as `class_ids`).
    With `classes_of` (a dho dataset or class names file) every class must be one of that list (by
    name): the manifest records `class_subset_of`, as `prepare --classes-of` does. Shards are scanned and
    hashed in a pool of `processes` (default one per core; 1 = in this process). A `pipe:` command that prints
    nothing for `pipe_timeout` seconds (default $DHO_PIPE_TIMEOUT, else 300) is stopped with an error.
    """
    out = Path(out)
    pipe_timeout = resolve_pipe_timeout(pipe_timeout)  # checked before any command runs
    label_key = label_key.lower()  # webdataset lowercases member extensions
    classnames, class_ids = read_class_file(Path(classnames_file))
    classes = {"class_ids": class_ids}
    if classes_of is not None:
        ref_names, _ = read_class_list(classes_of)
        where = {n: i for i, n in enumerate(ref_names)}
        missing = [n for n in classnames if n not in where]
        if missing:
            raise DatasetError(f"{classnames_file}: {len(missing)} class name(s) are not classes of {classes_of} "
                               f"(first: {missing[0]!r}); a subset must use the reference's names")
        classes["class_subset_of"] = {"reference": str(Path(classes_of).resolve()), "num_classes": len(ref_names),
                                      "indices": [where[n] for n in classnames]}
    if not shards:
        raise DatasetError("no shards given; pass the .tar shards in their global order")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder; choose another --out")
    if (out / MANIFEST).exists() and not overwrite:
        raise DatasetError(f"{out / MANIFEST} already exists; pass --overwrite to replace it")
    if (out / MANIFEST).exists() and dataset_entries(out) is None:
        raise DatasetError(f"--overwrite: {out / MANIFEST} is not a dho manifest; it is left alone, choose another --out")
    given = set()
    paths = []
    for p in (p for arg in shards for p in (expand_braces(arg) if isinstance(arg, str) else [arg])):
        p = _shard_source(p)
        if p in given:
            raise DatasetError(f"shard {p} is given twice; list each shard once")
        given.add(p)
        paths.append(p)
    out_abs = out.resolve()
    # per shard: its keys, labels and spans as arrays (the lists a scan returns live for one shard only), so
    # index peaks at ~150 bytes per sample (measured), not ~450 with a Python object per key; the fingerprint
    # is fed shard by shard
    keys, labels, spans, digests, entries = [], [], [], [], []

    def no_duplicates(all_keys: np.ndarray) -> None:
        """The error the streamed check gave: the first key seen again, naming its first shard and this one."""
        found = first_duplicate(all_keys)
        if found is not None:
            rows = np.searchsorted(np.cumsum([len(k) for k in keys]), found, side="right")
            key = all_keys[found[1]].decode("utf-8")
            raise DatasetError(f"sample key {key!r} appears in shard {paths[rows[0]]} and again in shard {paths[rows[1]]}; "
                               "keys must be unique across all shards")

    def shard_dicts():
        scans = scan_shards(paths, label_key, processes, pipe_timeout)
        for p in paths:
            shard_keys = None
            try:
                scan = next(scans)
                shard_keys, shard_labels, sha256, shard_spans = scan["keys"], scan["labels"], scan["sha256"], scan["spans"]
                lab = np.asarray(shard_labels, dtype=np.int64)
                bad = np.flatnonzero((lab < -1) | (lab >= len(classnames)))
                if len(bad):
                    raise DatasetError(f"shard {p}: sample {shard_keys[bad[0]]!r} has label {lab[bad[0]]} but {classnames_file} lists {len(classnames)} classes; fix the labels or the class names file")
            except DatasetError:  # a key repeated up to this shard is reported first, as a check shard by shard finds it
                seen = keys + ([encode_strings(shard_keys)] if shard_keys else [])
                if seen:
                    no_duplicates(np.concatenate(seen))
                raise
            try:
                path = p if is_url(p) else p.relative_to(out_abs).as_posix()
            except ValueError:
                path = str(p)
            entries.append({"path": path, "count": len(shard_keys), "sha256": sha256, "size": scan["size"]})
            keys.append(encode_strings(shard_keys))
            labels.append(lab)
            spans.append(None if shard_spans is None else np.asarray(shard_spans, dtype=np.int64).reshape(-1, 2))
            digests.append(np.asarray(scan["digests"], dtype=np.uint32))
            yield {"name": Path(path).name, "count": len(shard_keys), "sha256": sha256, "keys": shard_keys, "labels": shard_labels}

    fingerprint = fingerprint_chunks(classnames, shard_dicts())
    all_keys = np.concatenate(keys)  # (N,) S{W}: the widest key's width, as encode_strings of all keys gives
    no_duplicates(all_keys)
    columns = Columns(all_keys, np.concatenate(labels), None,
                      None if any(sp is None for sp in spans) else np.concatenate(spans), np.concatenate(digests))
    del keys[:], labels[:], spans[:], digests[:]
    provenance = {"command": "index", "label_key": label_key, "classnames_file": Path(classnames_file).name, "dho_version": dho.__version__}
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed index leaves no folder behind
    write_manifest(make_manifest(classnames, entries, [], provenance, label_key=label_key, classes=classes), out / MANIFEST,
                   columns=columns, fingerprint=fingerprint)
    return Dataset.open(out)
