"""Datasets: webdataset tar shards + manifest.json, splits, ordered reading, view replay.

A dataset is a folder holding `manifest.json` and webdataset tar shards (`shard-000000.tar`, ...).
Each sample is `__key__`, the original encoded image bytes under their own lowercased extension
(`jpg`, `png`, `webp`, ...), and `cls` (ASCII int label; absent or -1 = unlabeled). The global row
of a sample is the offset of its shard (sum of the earlier counts) plus its position in the shard.
The manifest lists every shard's count and sha256, and beside it, as .npy columns, every sample's key,
label and byte span (`Columns`), so readers check what they read.
A shard's path is a local file (relative to the manifest when it lies below it) or, as webdataset
spells it, a `pipe:COMMAND` URL whose command prints the tar to stdout (object storage:
`pipe:aws s3 cp s3://bucket/shard-000000.tar -`); `dho index` expands brace ranges
(`shard-{000000..000099}.tar`) as webdataset does.

Shards are written and read with the standard library's tarfile, byte for byte as webdataset's
TarWriter writes them and grouped into samples as webdataset groups them (`tar_samples`; tests
check both against webdataset), and torch is imported only by what needs it (view replay, the
`OrderedReader` made on first use): the data commands (prepare, index, split) start without torch.
Out of scope here: the training streams of
`dho distill` (see distill) and image augmentation beyond the RandomResizedCrop + flip of the
paper, which is reduced to replayable parameters (`view_params` / `replay_view`).

Images larger than PIL's default decompression-bomb limit (about 89 MP) are allowed up to
`MAX_IMAGE_PIXELS` (see below); PIL still refuses images over twice that, which `prepare` reports
as an unreadable file.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

import dho
from dho.atomic import guard_out, remove_stale, temp_sibling
from dho.errors import ConfigError, DatasetError, check_number

MANIFEST = "manifest.json"
FORMAT, VERSION = "dho-dataset", 2  # version 1 (keys and labels in the JSON) still opens
# extensions torchvision's ImageFolder accepts; stored lowercased, bytes never re-encoded
IMAGE_EXTS = ("jpg", "jpeg", "jfif", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")
# what `prepare` says about files it does not read (all are listed in the manifest's `ignored`)
NOT_READ = {"heic": "HEIC needs a plug-in PIL does not have; convert to JPEG or PNG",
            "heif": "HEIF needs a plug-in PIL does not have; convert to JPEG or PNG",
            "avif": "AVIF needs a plug-in PIL may not have; convert to JPEG or PNG",
            "gif": "GIF is animated or palette-only; convert the frame you want to PNG"}
# decode silently up to 200 MP (a 14k x 14k scan); PIL itself refuses above 2x this
MAX_IMAGE_PIXELS = 200_000_000
if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# RandomResizedCrop of the paper (Table 6): area fraction and aspect ratio ranges
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_P = 0.5
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# types
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    key: str
    image: Optional[Image.Image]  # RGB; None when read with decode=False
    label: int  # -1 = unlabeled
    index: int  # global row
    shard: int
    data: Optional[bytes] = None  # the encoded image bytes as stored in the shard
    ext: Optional[str] = None  # their extension, e.g. "jpg"


class Columns:
    """Per-sample columns of a dataset in global row order, as numpy arrays (memory-mapped for v2).

    `keys` (N,) fixed-width bytes (UTF-8, zero-padded), `labels` (N,) int64 (-1 = unlabeled),
    `files` (N,) fixed-width bytes or None (original relative file names, `prepare` only). Arrays
    only, no Python object per sample: forked DataLoader workers share them with the main process
    (reading a memory map or an inherited array copies no page)."""

    def __init__(self, keys: np.ndarray, labels: np.ndarray, files: Optional[np.ndarray], spans: Optional[np.ndarray] = None,
                 base: int = 0):
        self.keys, self.labels, self.files = keys, labels, files
        self.spans = spans  # (N, 2) int64 [start, end) bytes of each sample's members in its tar, or None
        self.base = base  # global row of row 0 (a shard's own slice, `ShardInfo.standalone`)

    @classmethod
    def from_lists(cls, keys: list, labels: list, files: Optional[list], spans: Optional[list] = None) -> "Columns":
        return cls(encode_strings(keys), np.asarray(labels, dtype=np.int64).reshape(-1),
                   None if files is None else encode_strings(files),
                   None if spans is None else np.asarray(spans, dtype=np.int64).reshape(-1, 2))


def encode_strings(items: Sequence[str]) -> np.ndarray:
    """Strings -> (N,) numpy fixed-width bytes `S{W}` of their UTF-8, W = the longest (at least 1)."""
    encoded = [str(x).encode("utf-8") for x in items]
    return np.array(encoded, dtype=f"S{max([1, *map(len, encoded)])}")


def decode_strings(raw: np.ndarray) -> list[str]:
    """(n,) fixed-width bytes -> n strings (numpy strips the zero padding)."""
    return [b.decode("utf-8") for b in np.asarray(raw).tolist()]


@dataclass(frozen=True)
class ShardInfo:
    path: Union[Path, str]  # absolute Path of a local shard; a `pipe:` URL as a str
    count: int
    offset: int  # global row of the shard's first sample
    sha256: str
    columns: Columns = field(repr=False)

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

    def standalone(self) -> "ShardInfo":
        """This shard with copies of only its own rows of the columns: what a pool task is sent (O(count), not O(N))."""
        c, rows = self.columns, self._rows
        part = lambda a: None if a is None else np.array(a[rows])  # noqa: E731
        return ShardInfo(self.path, self.count, self.offset, self.sha256,
                         Columns(part(c.keys), part(c.labels), part(c.files), part(c.spans), base=self.offset))

    @property
    def name(self) -> str:
        """For messages: a local shard's file name, a URL whole."""
        return self.path if is_url(self.path) else self.path.name


class Dataset:
    """A dataset folder opened from its manifest.json. Cheap: reads no shard.

    Version 2 manifests (written since dho 0.?) are columnar: manifest.json holds the class names,
    the shards (path, count, sha256) and the content fingerprint computed when it was written;
    keys, labels and file names are numpy arrays beside it (`manifest.keys.npy`, ...), opened as
    memory maps, so opening costs O(shards), not O(samples). Version 1 manifests (keys and labels
    in the JSON) still open; their columns are built in memory and the JSON lists are dropped."""

    def __init__(self, root: Path, manifest: dict):
        where = root / MANIFEST
        if manifest.get("format") != FORMAT or manifest.get("version") not in (1, VERSION):
            raise DatasetError(
                f"{where}: not a {FORMAT} manifest of version 1 or {VERSION} "
                f"(format={manifest.get('format')!r}, version={manifest.get('version')!r}); "
                "re-create it with `dho prepare` or `dho index`, or use the dho version that wrote it"
            )
        self.version = manifest["version"]
        for field_ in ("classnames", "shards", "num_samples") + (("fingerprint", "columns") if self.version >= 2 else ()):
            if field_ not in manifest:
                raise DatasetError(f"{where}: field {field_!r} is missing; re-create it with `dho prepare` or `dho index`")
        self.root = root
        self.classnames = list(manifest["classnames"])
        self.num_classes = len(self.classnames)
        self.label_key = manifest.get("label_key", "cls").lower()
        per_shard = ("path", "count", "sha256") + (("keys", "labels") if self.version == 1 else ())
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
            self.columns = _open_columns(root, manifest["columns"], num, where)
            self.fingerprint = manifest["fingerprint"]
        self.manifest = manifest
        self.shards: list[ShardInfo] = []
        offset = 0
        for s in manifest["shards"]:
            self.shards.append(ShardInfo(_shard_path(s["path"], root), s["count"], offset, s["sha256"], self.columns))
            offset += s["count"]
        self.num_samples = offset
        self.key_bytes: np.ndarray = self.columns.keys  # (N,) S{W}
        self.labels: np.ndarray = self.columns.labels  # (N,) int64
        self._keys: Optional[list[str]] = None
        bad = np.flatnonzero((self.labels < -1) | (self.labels >= self.num_classes))
        if len(bad):
            raise DatasetError(
                f"{where}: sample {self.key(int(bad[0]))!r} has label {self.labels[bad[0]]} outside "
                f"[-1, {self.num_classes}); check the class names"
            )

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


SHARD_COLUMNS = ("keys", "labels", "files", "spans")  # per-sample lists of a v1 shard entry, columns in v2


def _open_columns(root: Path, spec: dict, num: int, where: Path) -> Columns:
    arrays = {}
    for name in SHARD_COLUMNS:
        if name not in spec:
            if name in ("files", "spans"):  # optional: prepare's file names; byte spans (local tars only)
                arrays[name] = None
                continue
            raise DatasetError(f"{where}: lists no {name!r} column; re-create it with `dho prepare` or `dho index`")
        path = root / spec[name]
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DatasetError(f"{where}: its {name} column {path.name} is missing; restore it or re-create the manifest with `dho index`") from None
        except (ValueError, OSError) as e:
            raise DatasetError(f"{where}: its {name} column {path.name} is not a readable .npy file ({e}); re-create the manifest with `dho index`") from None
        want = {"labels": ("int64", (num,)), "spans": ("int64", (num, 2))}.get(name, ("bytes", (num,)))
        kind_ok = arr.dtype.kind == "S" if want[0] == "bytes" else arr.dtype == np.int64
        if arr.shape != want[1] or not kind_ok:
            raise DatasetError(f"{where}: its {name} column {path.name} is {arr.dtype} {arr.shape}, expected {want[1]} "
                               f"{want[0]}; re-create the manifest with `dho index`")
        arrays[name] = arr
    return Columns(arrays["keys"], arrays["labels"], arrays["files"], arrays["spans"])


def _fingerprint_chunks(classnames: list, shard_dicts: Iterator[dict]) -> str:
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
    return _fingerprint_chunks(classnames, (
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
    return _fingerprint_chunks(classnames, dicts())


def file_sha256(path: str | Path, block: int = 1 << 24) -> str:
    """sha256 of a file, streamed in 16 MiB blocks (shards and checkpoints can be several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


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


# --------------------------------------------------------------------------------------------
# shards at URLs: pipe: commands, file: paths, brace ranges (as webdataset spells them)
# --------------------------------------------------------------------------------------------

PIPE, FILE = "pipe:", "file:"
MAX_EXPANSION = 1_000_000  # names one brace pattern may expand to
# what `index` suggests for a URL given without pipe: (webdataset itself runs curl for http and https)
URL_COMMANDS = {"http": "curl -sfL {}", "https": "curl -sfL {}", "s3": "aws s3 cp {} -", "gs": "gcloud storage cat {}"}
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")  # {first..last} or {first..last..step}


def is_url(path) -> bool:
    """Whether a shard path is a `pipe:` URL (read through its command), not a local file."""
    return isinstance(path, str) and path.startswith(PIPE)


def _shard_path(path: str, root: Path) -> Union[Path, str]:
    """A manifest's shard path: a `pipe:` URL as it is; a local path (`file:` dropped) made absolute, a
    relative one against the manifest's folder."""
    if is_url(path):
        return path
    local = Path(path[len(FILE):] if path.startswith(FILE) else path)
    return local if local.is_absolute() else root / local


@contextlib.contextmanager
def open_shard(path: Union[PathLike, str]) -> Iterator[BinaryIO]:
    """A shard's bytes as a stream: a local file (`file:PATH` too), or what the command of a `pipe:` URL
    prints, run by the shell as webdataset runs it. The command's exit status is checked once the stream
    is read to its end; a failing command (or a missing file) is a one-line DatasetError naming the URL.
    A reader that stops early ends the command."""
    if not is_url(path):
        local = path[len(FILE):] if isinstance(path, str) and path.startswith(FILE) else path
        try:
            f = open(local, "rb")
        except FileNotFoundError:
            raise DatasetError(f"shard {path} not found; check the path, or restore the shard") from None
        with f:
            yield f
        return
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty command cannot block on it
        proc = subprocess.Popen(path[len(PIPE):], shell=True, stdout=subprocess.PIPE, stderr=stderr)
        try:
            yield proc.stdout
            while proc.stdout.read(1 << 20):  # the rest (a tar's zero padding), so the command ends by itself
                pass
        except Exception:
            # an empty or cut stream is most often a command that failed: then that is the error to report
            try:
                status = proc.wait(timeout=1)
            except subprocess.TimeoutExpired:  # still printing: the stream itself was bad
                status = 0
                proc.kill()
                proc.wait()
            proc.stdout.close()
            _check_command(path, status, stderr)
            raise
        except BaseException:  # the reader stopped early (GeneratorExit) or Ctrl-C
            proc.kill()
            proc.wait()
            proc.stdout.close()
            raise
        proc.stdout.close()
        _check_command(path, proc.wait(), stderr)


def _check_command(url: str, status: int, stderr) -> None:
    if status == 0:
        return
    stderr.seek(0)
    said = [line.strip() for line in stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
    how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
    raise DatasetError(f"shard {url}: the command {how}" + (f" ({said[-1][:200]})" if said else "")
                       + "; run it in a shell to check that it prints the tar to stdout")


def shard_sha256(path: Union[PathLike, str]) -> str:
    """sha256 of a shard's bytes: a local file hashed in place, a `pipe:` URL streamed."""
    if not is_url(path):
        return file_sha256(path)
    h = hashlib.sha256()
    with open_shard(path) as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def expand_braces(pattern: str) -> list[str]:
    """The names a shard pattern stands for, by the `braceexpand` package's rules (which webdataset uses):
    `{000..099}` is a range of integers, both ends included, zero-padded to the wider end when either end
    starts with 0, counting down when the first is larger, `{0..100..10}` with a step; `{a,b}` is a list
    whose items may hold groups; several groups combine left to right, the first varying slowest. A group
    that is neither (`{}`, awk's `'{print $1}'`) stays as it is. Backslashes are not escapes. A range
    that is not of integers, or a brace without its partner, is a DatasetError."""
    return _expand(pattern, pattern)


def _expand(text: str, pattern: str) -> list[str]:
    parts, start, depth = [], 0, 0  # parts: the alternatives of each literal and top-level group, in order
    for pos, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                parts.append([text[start:pos]])
                start = pos
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                break
            if depth == 0:
                parts.append(_expand_group(text[start + 1:pos], pattern))
                start = pos + 1
    if depth != 0:
        raise DatasetError(f"shard pattern {pattern!r} has unbalanced braces; close every {{ with a }}")
    parts.append([text[start:]])
    if (count := math.prod(len(p) for p in parts)) > MAX_EXPANSION:
        raise DatasetError(f"shard pattern {pattern!r} expands to {count} names (at most {MAX_EXPANSION}); check its ranges")
    return ["".join(choice) for choice in itertools.product(*parts)]


def _expand_group(body: str, pattern: str) -> list[str]:
    """The names of one `{...}` group (without its braces): a list, a range, or the group kept as it is."""
    items, start, depth = [], 0, 0
    for pos, ch in enumerate(body):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(body[start:pos])
            start = pos + 1
    if items:
        items.append(body[start:])
        return [name for item in items for name in _expand(item, pattern)]
    if ".." in body and "{" not in body:
        match = _INT_RANGE.match(body)
        if match is None:
            raise DatasetError(f"shard pattern {pattern!r}: {{{body}}} is not a range of integers; write it as "
                               "{FIRST..LAST} (e.g. {000000..000099}) or list the names as {a,b,c}")
        first, last, step = match.groups()
        a, b, k = int(first), int(last), int(step or 1) or 1
        if abs(b - a) // k + 1 > MAX_EXPANSION:
            raise DatasetError(f"shard pattern {pattern!r}: {{{body}}} expands to more than {MAX_EXPANSION} names; check the range")
        pad = max(len(first), len(last)) if any(e.startswith(("0", "-0")) and e not in ("0", "-0") for e in (first, last)) else 0
        values = range(a, b + 1, k) if a < b else range(a, b - 1, -k)
        return [f"{v:0{pad}d}" for v in values]
    return ["{" + name + "}" for name in _expand(body, pattern)]


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _undecodable(where: str, ext: str, e: Exception) -> DatasetError:
    return DatasetError(f"{where}: cannot decode the {ext} image ({e}); replace the file or leave it out (prepare --skip-bad)")


def to_rgb8(im: Image.Image) -> Image.Image:
    """Every decoded image to 8-bit RGB, scaling what PIL's own convert("RGB") would clip.

    16-bit greyscale (I;16*, and 16-bit data PIL holds as I) is scaled by 65535, so it is not almost
    all white; 32-bit float (F) by 1 when its values lie in [0, 1] (the usual float TIFF), else
    clipped to [0, 255], so it is not all black; alpha (RGBA, LA, PA, palette with transparency) is
    composited over white; CMYK and other modes go through PIL's conversion.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        top = float(a.max()) if a.size else 0.0
        if mode == "F":
            scale = 1.0 if top <= 1.0 else 255.0
        else:
            scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
        grey = np.clip(np.round(a * (255.0 / scale)), 0, 255).astype(np.uint8)  # (H, W)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, ext: str, where: str) -> Image.Image:
    """Decode encoded image bytes into an 8-bit RGB PIL image (`to_rgb8`); errors name `where`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb8(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _undecodable(where, ext, e) from e


def _image_ext(sample: dict) -> Optional[str]:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def member_key(name: str) -> tuple[Optional[str], Optional[str]]:
    """A tar member name -> (sample key, extension): webdataset's rule, split at the first '.' of the
    basename (`n01/img_1.cls` -> (`n01/img_1`, `cls`)); (None, None) for names without one."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


def tar_samples(path: PathLike) -> Iterator[dict]:
    """The samples of a webdataset tar as webdataset groups them: consecutive regular members with one
    key form a sample {"__key__": key, ext (lower case): bytes}; `__...__` members are skipped; a key's
    extension appearing twice in a row is an error. Streams the file or `pipe:` URL (`open_shard`; one
    sample in memory). The data commands read shards with this (plain tarfile: no torch import);
    webdataset reads the same shards the same way."""
    current: Optional[dict] = None
    try:
        with open_shard(path) as f, tarfile.open(fileobj=f, mode="r|*") as stream:
            for info in stream:
                if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                    continue
                key, ext = member_key(info.name)
                if key is None:
                    continue
                ext = ext.lower()
                data = stream.extractfile(info).read()
                stream.members = []  # streaming: keep no member list
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                if ext in current:
                    raise DatasetError(f"shard {path}: sample {key!r} has two {ext!r} members; fix the shard")
                current[ext] = data
    except (tarfile.TarError, EOFError) as e:
        raise DatasetError(f"shard {path}: not a readable tar file ({e}); check or re-create it") from e
    if current is not None:
        yield current


def iter_shard(ds: Dataset, shard_index: int, decode: bool = True) -> Iterator[Sample]:
    """Samples of one shard in order; each key is checked against the manifest while reading."""
    yield from _shard_samples(ds.shards[shard_index], shard_index, ds.label_key, ds.root, decode)


def _shard_samples(shard: ShardInfo, shard_index: int, label_key: str, root: Path, decode: bool) -> Iterator[Sample]:
    """`iter_shard` of one ShardInfo (what a pool worker is sent instead of the whole dataset)."""
    name = f"shard {shard_index} ({shard.path})"
    if not is_url(shard.path) and not shard.path.is_file():
        raise DatasetError(f"{name} of dataset {root} is missing; restore it or re-run `dho prepare`/`dho index`")
    changed = "the shard changed since the manifest was written; run `dho index` again or restore the shard"
    keys, labels = shard.keys, shard.labels  # this shard's slice of the columns, decoded once
    j = -1
    for j, raw in enumerate(tar_samples(shard.path)):
        key = raw["__key__"]
        if j >= shard.count:
            raise DatasetError(f"{name}: holds more than the {shard.count} samples of the manifest (extra key {key!r}); {changed}")
        if key != keys[j]:
            raise DatasetError(f"{name}: sample {j} has key {key!r} but the manifest expects {keys[j]!r}; {changed}")
        ext = _image_ext(raw)
        if ext is None:
            raise DatasetError(f"{name}: sample {key!r} has no image member (one of {', '.join(IMAGE_EXTS)}); {changed}")
        label = labels[j]
        if label_key in raw and raw[label_key].strip() != str(label).encode("ascii"):
            raise DatasetError(f"{name}: sample {key!r} has label {raw[label_key][:20]!r} but the manifest says {label}; {changed}")
        data = raw[ext]
        image = decode_image(data, ext, f"{name} key {key!r}") if decode else None
        yield Sample(key=key, image=image, label=label, index=shard.offset + j, shard=shard_index, data=data, ext=ext)
    if j + 1 != shard.count:
        raise DatasetError(f"{name}: holds {j + 1} samples but the manifest says {shard.count}; {changed}")


def assign_shards(num_shards: int, consumer: int, num_consumers: int) -> list[int]:
    """Whole shards for one consumer (rank x worker), round-robin: consumer c gets c, c + n, c + 2n, ..."""
    if not 0 <= consumer < num_consumers:
        raise ValueError(f"consumer {consumer} not in [0, {num_consumers})")
    return list(range(consumer, num_shards, num_consumers))


def _dist_rank_world() -> tuple[int, int]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _ordered_reader_class():
    """OrderedReader is a torch IterableDataset; it is made on first use (`data.OrderedReader`), so the
    data commands (prepare, index, split) never import torch."""
    import torch

    class OrderedReader(torch.utils.data.IterableDataset):
        """Every sample of this (rank, DataLoader worker)'s whole shards, in shard order.

        Consumers are rank x worker (consumer = rank * num_workers + worker). The union over all
        ranks and workers is every sample of `shards` (default: all) exactly once; each yielded
        item carries its global row (`Sample.index`) when `transform` keeps it.
        """

        def __init__(self, ds: Dataset, transform: Optional[Callable] = None, rank: Optional[int] = None,
                     world_size: Optional[int] = None, shards: Optional[Sequence[int]] = None, decode: bool = True):
            super().__init__()
            dist_rank, dist_world = _dist_rank_world()
            self.ds = ds
            self.transform = transform
            self.rank = dist_rank if rank is None else rank
            self.world_size = dist_world if world_size is None else world_size
            self.shards = list(range(len(ds.shards))) if shards is None else list(shards)
            self.decode = decode
            if not 0 <= self.rank < self.world_size:
                raise ConfigError(f"rank {self.rank} is not in [0, world_size={self.world_size})")

        def my_shards(self) -> list[int]:
            info = torch.utils.data.get_worker_info()
            worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
            consumer = self.rank * num_workers + worker
            picked = assign_shards(len(self.shards), consumer, self.world_size * num_workers)
            return [self.shards[i] for i in picked]

        def __iter__(self):
            for s in self.my_shards():
                for sample in iter_shard(self.ds, s, decode=self.decode):
                    yield sample if self.transform is None else self.transform(sample)

    OrderedReader.__qualname__ = "OrderedReader"  # pickled by reference (spawned workers): dho.data.OrderedReader
    return OrderedReader


def __getattr__(name: str):  # PEP 562: module attributes made on first access
    if name == "OrderedReader":
        cls = _ordered_reader_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# process pools: the per-file and per-shard work of prepare, index and split
# --------------------------------------------------------------------------------------------


def _pool_size(tasks: int, processes: Optional[int]) -> int:
    """One process per core this process may use (`processes` overrides), never more than there are tasks."""
    if processes is None:
        processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(tasks, processes))


_stopping = None  # in a pool worker: the caller's Event, set when it stops early; queued tasks then do nothing


def _pool_worker_init(stopping) -> None:
    global _stopping
    _stopping = stopping
    # Ctrl-C reaches the whole process group and the main process decides. A handler that does nothing, not
    # SIG_IGN: the commands of pipe: shards a worker starts get the default back (exec resets handlers) and stop
    signal.signal(signal.SIGINT, lambda signum, frame: None)


def _pool_task(fn: Callable, task: tuple):
    return None if _stopping.is_set() else fn(*task)


def _pool_map(fn: Callable, tasks: Sequence[tuple], processes: Optional[int] = None) -> Iterator:
    """fn(*task) for every task, results in task order. Several tasks run in a process pool (tar parsing,
    hashing and image decoding are CPU-bound); at most two tasks per process are in flight, so finished
    results wait in memory only that long. processes=1 runs every task here, one by one. An error raised
    by a task (a one-line DatasetError) reaches the caller as it is."""
    workers = _pool_size(len(tasks), processes)
    if workers == 1:
        yield from (fn(*task) for task in tasks)
        return
    import multiprocessing

    # fork is cheap and the pool only runs this module's functions (no torch, no threads of ours)
    context = multiprocessing.get_context("fork")
    stopping = context.Event()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_pool_worker_init, initargs=(stopping,))
    finished = False
    try:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.submit(_pool_task, fn, task))
            if len(pending) == 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        finished = True
    finally:
        if not finished:  # an error, Ctrl-C or a caller that stopped reading: end without the queued tasks
            stopping.set()
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# writing: shards + manifest, atomically
# --------------------------------------------------------------------------------------------


class _HashedFile:
    """A file opened for writing that hashes (sha256) what is written to it: a shard is never read back."""

    def __init__(self, path: Path):
        self.file, self.sha256 = open(path, "wb"), hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


class _ShardWriter:
    """Deterministic webdataset shards: fixed mtime/owner/mode, PAX headers (non-ASCII names)."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.entries: list[dict] = []
        self.file = self.tar = None

    def write(self, key: str, ext: str, data: bytes, label: int, file: Optional[str] = None) -> None:
        if self.tar is None or self.entries[-1]["count"] == self.shard_size:
            self._roll()
        start = self.tar.offset
        members = {ext: data}
        if label >= 0:
            members["cls"] = str(label).encode("ascii")
        for member_ext in sorted(members):  # as webdataset's TarWriter: members in sorted order, fixed metadata
            info = tarfile.TarInfo(f"{key}.{member_ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(members[member_ext]), 0, 0o644, "", ""
            self.tar.addfile(info, io.BytesIO(members[member_ext]))
        e = self.entries[-1]
        e["count"] += 1
        e["keys"].append(key)
        e["labels"].append(int(label))
        e["spans"].append((start, self.tar.offset))  # the sample's bytes in the tar: header(s) + padded data
        if file is not None:
            e.setdefault("files", []).append(file)

    def _roll(self) -> None:
        self._close_current()
        name = f"shard-{len(self.entries):06d}.tar"
        self.file = _HashedFile(self.folder / name)
        self.tar = tarfile.open(fileobj=self.file, mode="w|")  # PAX (the default): non-ASCII names
        self.entries.append({"path": name, "count": 0, "sha256": "", "keys": [], "labels": [], "spans": []})

    def _close_current(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.file.close()
            self.entries[-1]["sha256"] = self.file.sha256.hexdigest()
            self.tar = self.file = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.entries


def _manifest(classnames: list, shards: list, skipped: list, provenance: dict, label_key: str = "cls",
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


def _dump_manifest(manifest: dict, path: Path) -> None:
    """Write a columnar (v2) manifest: the per-sample lists of `manifest["shards"]` (keys, labels, files)
    go to .npy columns beside `path`, named after the content fingerprint, which is computed here
    (once, at write time); manifest.json (readable: one line per field and per shard, no timestamps)
    is replaced last and atomically, then the columns of the manifest it replaced are removed. A
    crash at any point leaves the old manifest with its own columns, or the new one with its own."""
    shards = manifest["shards"]
    fingerprint = _fingerprint(manifest["classnames"], shards)
    with_files = bool(shards) and all(s.get("files") is not None for s in shards)
    with_spans = bool(shards) and all(s.get("spans") is not None for s in shards)
    columns = Columns.from_lists([k for s in shards for k in s["keys"]], [lab for s in shards for lab in s["labels"]],
                                 [f for s in shards for f in s["files"]] if with_files else None,
                                 [sp for s in shards for sp in s["spans"]] if with_spans else None)
    folder = path.parent
    names = {}
    for name in SHARD_COLUMNS:
        arr = getattr(columns, name)
        if arr is None:
            continue
        names[name] = f"manifest.{fingerprint[:16]}.{name}.npy"
        tmp = folder / (names[name] + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, folder / names[name])
    manifest = dict(manifest)
    manifest.update(version=VERSION, fingerprint=fingerprint, columns=names,
                    shards=[{k: v for k, v in s.items() if k not in SHARD_COLUMNS} for s in shards])
    order = ["format", "version", "fingerprint", "columns"]
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    os.replace(tmp, path)
    for name in old - set(names.values()):
        (folder / name).unlink(missing_ok=True)


def _column_files(folder: Path) -> set:
    """The column files named by the dho manifest in `folder` (empty if none or not a v2 manifest)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return {Path(str(n)).name for n in manifest.get("columns", {}).values()}
    except (OSError, ValueError, AttributeError):
        return set()


def _dataset_entries(folder: Path) -> Optional[set]:
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


def _check_out(out: Path, overwrite: bool, what: str, sources: Sequence[Path] = ()) -> None:
    guard_out(out, overwrite, what=f"dataset ({what})", sources=sources, owned=_dataset_entries)


def _temp_dir(out: Path) -> Path:
    """A fresh hidden folder beside `out` to build it in (leftovers of killed writers removed first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = temp_sibling(out, "tmp")
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` folder with renames, so `out` is never half-written."""
    old = None
    if out.exists():
        old = temp_sibling(out, "old")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


class _Progress:
    """Plain periodic progress lines with rate and ETA on stderr."""

    def __init__(self, what: str, total: int, every_s: float = 10.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.what}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.1f}%) "
                  f"{rate:.1f}/s ETA {eta:.0f}s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# prepare: ImageFolder -> shards
# --------------------------------------------------------------------------------------------


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
    if not src.is_dir():
        raise DatasetError(f"{src} is not a folder; give an ImageFolder tree (one sub-folder per class)")
    _check_out(out, overwrite, "prepare", sources=[src])
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
            if not p.is_file() or any(part.startswith(".") for part in rel.parts):
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
                classes: Optional[dict] = None, processes: Optional[int] = None) -> Dataset:
    """Write image files (relative file under `src`, key, label, ext), in this order, as a dataset at `out`:
    original bytes, every image decoded once to check it (in a pool of `processes`, default one per core,
    FILES_PER_TASK at a time), built beside `out` and renamed into place."""
    tmp = _temp_dir(out)
    try:
        writer = _ShardWriter(tmp, shard_size)
        skipped = []
        progress = _Progress(what, len(files))
        batches = [files[start:start + FILES_PER_TASK] for start in range(0, len(files), FILES_PER_TASK)]
        tasks = [(src, [file for file, _, _, _ in batch]) for batch in batches]
        for batch, checked in zip(batches, _pool_map(_read_and_check_files, tasks, processes)):
            for (file, key, label, ext), (data, reason) in zip(batch, checked):
                if data is None:
                    skipped.append({"file": file, "reason": reason})
                    continue
                writer.write(key, ext, data, label, file)
            progress.update(len(batch))
        shards = writer.close()
        skipped.sort(key=lambda s: s["file"])
        if skipped and not skip_bad:
            listed = "; ".join(f"{src / s['file']}: not a readable image ({s['reason']})" for s in skipped[:20])
            more = f" (and {len(skipped) - 20} more)" if len(skipped) > 20 else ""
            raise DatasetError(f"{listed}{more}; fix or remove them, or pass --skip-bad to leave them out")
        if not shards:
            raise DatasetError(f"{src}: no readable images at all; nothing to write")
        manifest = _manifest(classnames, shards, skipped, provenance, classes=classes)
        manifest["ignored"] = list(ignored)
        _dump_manifest(manifest, tmp / MANIFEST)
        _publish(tmp, out)
        if ignored:
            kinds = {}
            for item in ignored:
                ext = Path(item["file"]).suffix.lower() or "(no extension)"
                kinds[ext] = kinds.get(ext, 0) + 1
            print(f"{what}: ignored {len(ignored)} file(s) that are not images dho reads ("
                  + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + f"); listed under 'ignored' in {out / MANIFEST}",
                  file=sys.stderr, flush=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return Dataset.open(out)


# --------------------------------------------------------------------------------------------
# index: manifest for existing shards
# --------------------------------------------------------------------------------------------


def read_class_file(path: Path) -> tuple[list[str], Optional[list[str]]]:
    """A class names file -> (names, ids or None). Line i is class i: `NAME`, or `ID<TAB>NAME` where ID is
    the class's folder name in the distributed data (ImageNet: its WordNet id, e.g. `n01440764\ttench`)."""
    if not path.is_file():
        raise DatasetError(f"class names file {path} not found; give a text file with one class name per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
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


class _HashedReads:
    """A binary stream that hashes (sha256) what is read from it: a shard is scanned and hashed in one read."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.sha256 = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
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


def _scan_and_hash(path: Union[Path, str], label_key: str) -> tuple[list[str], list[int], str, Optional[list]]:
    """Keys and labels of a tar shard (file or `pipe:` URL) from member names (+ the small label members; no
    image decode), the sha256 of its bytes, in one streamed read, and each sample's byte span [start, end)
    (its members' headers and padded data) when the shard is an uncompressed local file, else None."""
    keys: list[str] = []
    labels: list[int] = []
    has_image: list[bool] = []
    spans: list[list[int]] = []
    try:
        with open_shard(path) as stream, tarfile.open(fileobj=(f := _HashedReads(stream)), mode="r|*") as tf:
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
                    keys.append(key)
                    labels.append(-1)
                    has_image.append(False)
                    spans.append([ti.offset, end])
                spans[-1][1] = end
                if ext == label_key:
                    raw = tf.extractfile(ti).read()
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
            while f.read(1 << 20):  # the rest of the bytes (padding), for the hash
                pass
    except (tarfile.TarError, EOFError) as e:
        raise DatasetError(f"shard {path}: not a readable tar file ({e}); check or re-create it") from e
    for key, ok in zip(keys, has_image):
        if not ok:
            raise DatasetError(f"shard {path}: sample {key!r} has no image member ({', '.join(IMAGE_EXTS)}); fix the shard")
    return keys, labels, f.sha256.hexdigest(), (spans if seekable else None)


def _scan_shards(paths: Sequence[Union[Path, str]], label_key: str, processes: Optional[int] = None) -> Iterator[tuple]:
    """(keys, labels, sha256, spans or None) of every shard, in order; shards are scanned in a process pool (one per core)
    when there are several, as tar parsing and hashing are CPU-bound."""
    yield from _pool_map(_scan_and_hash, [(p, label_key) for p in paths], processes)


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
          classes_of: Optional[PathLike] = None, processes: Optional[int] = None) -> Dataset:
    """Write OUT/manifest.json for existing webdataset shards (given order = global order).

    A shard given as a str is spelled as webdataset spells it: brace ranges and lists are expanded
    (`expand_braces`), `pipe:COMMAND` is read from the command's stdout (recorded as the URL itself;
    a relative path in the command is relative to the working directory of whoever reads the dataset),
    `file:PATH` is a local file; a Path is a local file as it is. Local shards are recorded relative to
    OUT when they lie below it, else absolute. The class names file has one class per line, `NAME` or `ID<TAB>NAME` (ids recorded as `class_ids`).
    With `classes_of` (a dho dataset or class names file) every class must be one of that list (by
    name): the manifest records `class_subset_of`, as `prepare --classes-of` does. Shards are scanned and
    hashed in a pool of `processes` (default one per core; 1 = in this process).
    """
    out = Path(out)
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
    if (out / MANIFEST).exists() and _dataset_entries(out) is None:
        raise DatasetError(f"--overwrite: {out / MANIFEST} is not a dho manifest; it is left alone, choose another --out")
    entries, owner, given = [], {}, set()
    paths = []
    for p in (p for arg in shards for p in (expand_braces(arg) if isinstance(arg, str) else [arg])):
        p = _shard_source(p)
        if p in given:
            raise DatasetError(f"shard {p} is given twice; list each shard once")
        given.add(p)
        paths.append(p)
    out_abs = out.resolve()
    for p, (keys, labels, sha256, spans) in zip(paths, _scan_shards(paths, label_key, processes)):
        for key in keys:
            if key in owner:
                raise DatasetError(f"sample key {key!r} appears in shard {owner[key]} and again in shard {p}; keys must be unique across all shards")
            owner[key] = p
        for key, lab in zip(keys, labels):
            if not -1 <= lab < len(classnames):
                raise DatasetError(f"shard {p}: sample {key!r} has label {lab} but {classnames_file} lists {len(classnames)} classes; fix the labels or the class names file")
        try:
            path = p if is_url(p) else p.relative_to(out_abs).as_posix()
        except ValueError:
            path = str(p)
        entries.append({"path": path, "count": len(keys), "sha256": sha256, "keys": keys, "labels": labels, "spans": spans})
    provenance = {"command": "index", "label_key": label_key, "classnames_file": Path(classnames_file).name, "dho_version": dho.__version__}
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed index leaves no folder behind
    _dump_manifest(_manifest(classnames, entries, [], provenance, label_key=label_key, classes=classes), out / MANIFEST)
    return Dataset.open(out)


# --------------------------------------------------------------------------------------------
# split: labeled subset (+ validation) as new datasets
# --------------------------------------------------------------------------------------------


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
    for line in path.read_text(encoding="utf-8").splitlines():
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


class _CopyWriter:
    """Shards made of samples copied byte for byte from other tars (their header and data blocks), closed
    as tarfile closes a stream: two zero blocks, then zeros up to a whole record. A copy of samples that
    `_ShardWriter` wrote is the file `_ShardWriter` would write; the same entries (count, keys, labels,
    files, spans, sha256 computed while writing)."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.entries: list[dict] = []
        self.file = None

    def copy(self, key: str, label: int, raw: bytes, file: Optional[str] = None) -> None:
        if self.file is None or self.entries[-1]["count"] == self.shard_size:
            self._roll()
        e = self.entries[-1]
        e["spans"].append((self.offset, self.offset + len(raw)))
        self._write(raw)
        e["count"] += 1
        e["keys"].append(key)
        e["labels"].append(int(label))
        if file is not None:
            e.setdefault("files", []).append(file)

    def _write(self, raw: bytes) -> None:
        self.file.write(raw)
        self.hash.update(raw)
        self.offset += len(raw)

    def _roll(self) -> None:
        self._close_current()
        name = f"shard-{len(self.entries):06d}.tar"
        self.file, self.hash, self.offset = open(self.folder / name, "wb"), hashlib.sha256(), 0
        self.entries.append({"path": name, "count": 0, "sha256": "", "keys": [], "labels": [], "spans": []})

    def _close_current(self) -> None:
        if self.file is not None:
            self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
            self._write(b"\0" * (-self.offset % tarfile.RECORDSIZE))
            self.file.close()
            self.entries[-1]["sha256"] = self.hash.hexdigest()
            self.file = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.entries


def _copy_samples(ds: Dataset, shard_index: int, role: np.ndarray, writers: list) -> None:
    """Copy the samples of one shard with role r >= 0 to writers[r], reading only their byte spans. Each
    copy must start with its key's member header, else the shard changed since the manifest was written."""
    shard = ds.shards[shard_index]
    rows = shard.offset + np.flatnonzero(role[shard.offset:shard.offset + shard.count] >= 0)
    name = f"shard {shard_index} ({shard.path})"
    if not shard.path.is_file():
        raise DatasetError(f"{name} of dataset {ds.root} is missing; restore it or re-run `dho prepare`/`dho index`")
    # this shard's chosen rows of the columns, read once (not element by element from the memory maps)
    spans = np.asarray(ds.columns.spans[rows]).tolist()
    labels, roles, keys = ds.labels[rows].tolist(), role[rows].tolist(), decode_strings(ds.key_bytes[rows])
    files = [None] * len(keys) if ds.columns.files is None else decode_strings(ds.columns.files[rows])
    fd = os.open(shard.path, os.O_RDONLY)
    try:
        for (start, end), key, label, r, file in zip(spans, keys, labels, roles, files):
            raw = os.pread(fd, end - start, start)
            if len(raw) != end - start or not _names_sample(raw, key):
                raise DatasetError(f"{name}: sample {key!r} is not at bytes {start}-{end} where the manifest puts it; the shard "
                                   "changed since the manifest was written: run `dho index` again or restore the shard")
            writers[r].copy(key, label, raw, file)
    finally:
        os.close(fd)


def _names_sample(raw: bytes, key: str) -> bool:
    """Whether `raw` starts with a tar header of a member of sample `key`: its ustar name (with the ustar
    prefix field), or, behind a PAX / GNU long-name header, the long name that follows."""
    head = raw[:tarfile.BLOCKSIZE]
    if len(head) < tarfile.BLOCKSIZE:
        return False
    want = key.encode("utf-8") + b"."
    if head[156:157] in (b"x", b"L"):  # PAX extended header or GNU long name: the name is in the next block(s)
        return (b"path=" + want) in raw[:4 * tarfile.BLOCKSIZE] or (head[156:157] == b"L" and raw[512:].startswith(want))
    name = head[:100].split(b"\0", 1)[0]
    prefix = head[345:500].split(b"\0", 1)[0] if head[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).startswith(want)


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
    for j, sample in enumerate(_shard_samples(shard, shard_index, label_key, root, decode=False)):
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
        _check_out(o, overwrite, "split", sources=[ds.root])
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

    tmps = [_temp_dir(o) for o in outs]
    try:
        role = np.full(ds.num_samples, -1, dtype=np.int64)  # (N,) 0 = labeled, 1 = validation
        role[labeled] = 0
        role[val] = 1
        # with the samples' byte spans (a local columnar manifest) their tar members are copied as they are,
        # reading only the chosen samples; else every touched shard is read (in a process pool) and its
        # chosen samples are re-written
        copy = ds.columns.spans is not None and all(isinstance(sh.path, Path) for sh in ds.shards)
        writers = [(_CopyWriter if copy else _ShardWriter)(t, shard_size) for t in tmps]
        touched = [s for s, shard in enumerate(ds.shards) if (role[shard.offset:shard.offset + shard.count] >= 0).any()]
        if copy:
            for s in touched:
                _copy_samples(ds, s, role, writers)
        else:
            tasks = [(ds.shards[s].standalone(), s, ds.label_key, ds.root, role[ds.shards[s].offset:ds.shards[s].offset + ds.shards[s].count])
                     for s in touched]
            for picked in _pool_map(_pick_samples, tasks, processes):
                for r, key, ext, data, label, file in picked:
                    writers[r].write(key, ext, data, label, file)
        for r, (t, w) in enumerate(zip(tmps, writers)):
            prov = dict(provenance, role="labeled" if r == 0 else "validation")
            manifest = _manifest(ds.classnames, w.close(), [], prov, label_key=ds.label_key if copy else "cls",
                                 classes=class_fields(ds))
            _dump_manifest(manifest, t / MANIFEST)
        for t, o in zip(tmps, outs):
            _publish(t, o)
    finally:
        for t in tmps:
            if t.exists():
                shutil.rmtree(t)
    return Dataset.open(out), (Dataset.open(val_out) if val_per_class else None)


# --------------------------------------------------------------------------------------------
# augmented views: replayable RandomResizedCrop + flip
# --------------------------------------------------------------------------------------------


def view_seed(seed: int, key: str, view: int) -> int:
    """Stable 63-bit seed of (seed, key, view): the first 8 bytes of sha256, top bit dropped."""
    digest = hashlib.sha256(f"{seed}|{key}|{view}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def view_params(key: str, view: int, seed: int, width: int, height: int) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip): torchvision RandomResizedCrop.get_params(scale=(0.5, 1),
    ratio=(3/4, 4/3)) + a p=0.5 flip, drawn from a generator seeded by (seed, key, view) only."""
    import torch

    g = torch.Generator().manual_seed(view_seed(seed, key, view))
    area = height * width
    log_ratio = torch.log(torch.tensor(CROP_RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(CROP_SCALE[0], CROP_SCALE[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            break
    else:  # central crop, aspect ratio clamped into the range
        in_ratio = width / height
        if in_ratio < min(CROP_RATIO):
            w, h = width, int(round(width / min(CROP_RATIO)))
        elif in_ratio > max(CROP_RATIO):
            w, h = int(round(height * max(CROP_RATIO))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = bool(torch.rand(1, generator=g).item() < FLIP_P)
    return top, left, h, w, flip


RESIZE_MODES = ("shortest", "squash", "longest")


def center_view_params(width: int, height: int, resize_mode: str) -> tuple[int, int, int, int, bool]:
    """The region of the original image that the evaluation view (`eval_view_uint8`) shows, as a box:
    `shortest` = the central square (torchvision rounding), `squash` and `longest` = the whole image.
    Stored in the cache for the center view; the view itself is made by `eval_view_uint8`."""
    if resize_mode in ("squash", "longest"):
        return 0, 0, height, width, False
    if resize_mode == "shortest":
        side = min(width, height)
        return int(round((height - side) / 2.0)), int(round((width - side) / 2.0)), side, side, False
    raise ConfigError(f"unknown resize_mode {resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")


def eval_view_uint8(image: Image.Image, size: int, interpolation: str, resize_mode: str) -> torch.Tensor:
    """The evaluation view, pixel for pixel open_clip's eval transform for this preprocessing -> (3, S, S) uint8.

    shortest: resize the short side to `size` (torchvision Resize on the PIL image), then center-crop
    S x S; squash: resize to S x S; longest: resize the long side to S keeping the ratio, then
    center-crop-or-pad with black to S x S. (Cropping first and resizing after, as training views
    do, resamples on another grid: up to 27 dB PSNR apart at some sizes.)
    """
    import torch

    from torchvision.transforms import functional as TF
    from torchvision.transforms import InterpolationMode

    if interpolation not in ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"):
        raise ConfigError(f"unknown interpolation {interpolation!r}; use bilinear or bicubic")
    mode = InterpolationMode(interpolation)
    image = image if image.mode == "RGB" else image.convert("RGB")
    if resize_mode == "squash":
        view = TF.resize(image, [size, size], mode)
    elif resize_mode == "shortest":
        view = TF.center_crop(TF.resize(image, size, mode), size)
    elif resize_mode == "longest":
        ratio = max(image.height / size, image.width / size)
        view = TF.center_crop(TF.resize(image, [round(image.height / ratio), round(image.width / ratio)], mode), size)
    else:
        raise ConfigError(f"unknown resize_mode {resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
    return torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


def replay_view_uint8(image: Image.Image, params: Sequence, size: int, interpolation: str) -> torch.Tensor:
    """Crop the box (top, left, h, w, flip) from the RGB image, resize to (size, size), flip -> (3, size, size) uint8.

    Integer boxes are cropped then resized (as torchvision's resized_crop, bit for bit); a box with
    fractional coordinates (`decode_view` on a downscaled JPEG) is resampled at sub-pixel precision.
    """
    import torch

    top, left, h, w = (float(p) for p in params[:4])
    flip = bool(params[4])
    if interpolation not in _INTERPOLATION:
        raise ConfigError(f"unknown interpolation {interpolation!r}; use one of {sorted(_INTERPOLATION)}")
    if top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > image.height + 1e-6 or left + w > image.width + 1e-6:
        raise DatasetError(f"view box (top={top:g}, left={left:g}, h={h:g}, w={w:g}) lies outside the {image.width}x{image.height} image; "
                           "the cache was built for other images")
    image = image if image.mode == "RGB" else image.convert("RGB")
    if all(v.is_integer() for v in (top, left, h, w)):
        view = image.crop((int(left), int(top), int(left + w), int(top + h))).resize((size, size), _INTERPOLATION[interpolation])
    else:
        view = image.resize((size, size), _INTERPOLATION[interpolation], box=(left, top, left + w, top + h))
    if flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., 3, S, S) -> float32 in [0, 1], then (x - mean) / std per channel, on x's device."""
    import torch

    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float().div_(255.0) - mean_t) / std_t


def replay_view(image: Image.Image, params: Sequence, size: int, interpolation: str,
                mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Crop the box from the original RGB image, resize to (size, size), flip, to [0, 1], normalise -> (3, size, size)."""
    return normalize(replay_view_uint8(image, params, size, interpolation), mean, std)


def decode_view(data: bytes, ext: str, where: str, params: Sequence, size: int) -> tuple[Image.Image, tuple]:
    """Decode an image for one crop box that will be resized to `size`; returns (RGB image, box in its pixels).

    JPEGs are decoded DCT-downscaled (libjpeg's 1/2, 1/4, 1/8) as long as the box keeps at least
    `size` pixels on its short side, and the box is scaled with the image: a 4000x3000 photo cropped
    to 224 px decodes about 8x faster. The view differs from a full decode by resampling noise only.
    The box then comes back in the smaller image's (fractional) pixels; other formats, and boxes
    that do not allow a reduction, decode at full size with the box unchanged.
    """
    top, left, h, w, flip = (int(p) for p in params)
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if top < 0 or left < 0 or h < 1 or w < 1 or top + h > height or left + w > width:
                raise DatasetError(f"{where}: view box (top={top}, left={left}, h={h}, w={w}) lies outside the "
                                   f"{width}x{height} image; the cache was built for other images")
            reduce = min(h, w) / size
            if im.format == "JPEG" and reduce >= 2:
                im.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
            im.load()
            image = to_rgb8(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _undecodable(where, ext, e) from e
    if image.size == (width, height):
        return image, (top, left, h, w, flip)
    fx, fy = image.width / width, image.height / height  # 1/2, 1/4 or 1/8 (up to libjpeg's rounding up)
    return image, (top * fy, left * fx, min(h * fy, image.height - top * fy), min(w * fx, image.width - left * fx), flip)
