"""Shards: where a shard's bytes come from, the samples of a tar, and tars written byte for byte.

A shard path is a local file or, as webdataset spells it, a `pipe:COMMAND` URL whose command prints
the tar to stdout (object storage: `pipe:aws s3 cp s3://bucket/shard-000000.tar -`), read through
`open_shard`; `file:PATH` is a local file, and `expand_braces` expands brace ranges and lists
(`shard-{000000..000099}.tar`) with webdataset's `braceexpand` package, a `pipe:` command's own braces
(awk's `'{print $1,$2}'`, `${VAR}`) left as written. Tars are read with the standard library's tarfile
and grouped into samples as webdataset groups them (`member_key`, `tar_samples`), and written byte for
byte as webdataset's TarWriter writes them (`ShardWriter`; `CopyWriter` copies samples' tar members
from other shards), hashed while written. Every sample written gets a digest of its members
(`sample_digest`, a crc32), which readers recompute on every read. Tests check both against webdataset.
Out of scope: what a shard should hold (the manifest, `manifest.py`) and image decoding (`reader.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import math
import os
import re
import select
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

from dho.errors import ConfigError, DatasetError

PathLike = Union[str, os.PathLike]
PIPE, FILE = "pipe:", "file:"
PIPE_TIMEOUT = 300.0  # seconds a pipe: command may print nothing before it counts as stalled (DHO_PIPE_TIMEOUT)
PIPE_TIMEOUT_ENV = "DHO_PIPE_TIMEOUT"
MAX_EXPANSION = 1_000_000  # names one brace pattern may expand to


# --------------------------------------------------------------------------------------------
# shard paths and URLs: pipe: commands, file: paths, brace ranges (as webdataset spells them)
# --------------------------------------------------------------------------------------------


def is_url(path) -> bool:
    """Whether a shard path is a `pipe:` URL (read through its command), not a local file."""
    return isinstance(path, str) and path.startswith(PIPE)


def shard_path(path: str, root: Path) -> Union[Path, str]:
    """A manifest's shard path: a `pipe:` URL as it is; a local path (`file:` dropped) made absolute, a
    relative one against the manifest's folder."""
    if is_url(path):
        return path
    local = Path(path[len(FILE):] if path.startswith(FILE) else path)
    return local if local.is_absolute() else root / local


def pipe_timeout(seconds: Optional[float] = None, option: str = "--pipe-timeout") -> float:
    """The stall limit of `pipe:` commands: `seconds` (from `option`) if given, else $DHO_PIPE_TIMEOUT, else PIPE_TIMEOUT."""
    given: object = seconds
    if seconds is None:
        given, option = os.environ.get(PIPE_TIMEOUT_ENV, "").strip(), f"${PIPE_TIMEOUT_ENV}"
        if not given:
            return PIPE_TIMEOUT
        try:
            seconds = float(given)
        except ValueError:
            seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ConfigError(f"{option} must be a positive number of seconds, not {given!r}")
    return float(seconds)


class _StallGuard:
    """A `pipe:` command's stdout whose reads wait at most `timeout` seconds for the next bytes (a command that
    hangs, e.g. on a dead network, would otherwise hold its reader forever). read(n) returns n bytes unless
    the stream ends, as a buffered pipe does."""

    def __init__(self, raw, url: str, timeout: float):
        self.raw, self.url, self.timeout = raw, url, timeout

    def read(self, n: int = -1) -> bytes:
        chunks, want = [], n
        while n < 0 or want > 0:
            if not select.select([self.raw], [], [], self.timeout)[0]:
                raise DatasetError(f"shard {self.url}: the command printed nothing for {self.timeout:g} s; check that it "
                                   f"runs in a shell, or allow it longer with ${PIPE_TIMEOUT_ENV} (or dho index --pipe-timeout)")
            chunk = self.raw.read(1 << 20 if n < 0 else min(want, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            want -= len(chunk)
        return b"".join(chunks)

    def __getattr__(self, name):
        return getattr(self.raw, name)


@contextlib.contextmanager
def open_shard(path: Union[PathLike, str], stall_timeout: Optional[float] = None) -> Iterator[BinaryIO]:
    """A shard's bytes as a stream: a local file (`file:PATH` too), or what the command of a `pipe:` URL
    prints, run by the shell as webdataset runs it. The command's exit status is checked once the stream
    is read to its end; a failing command (or a missing file) is a one-line DatasetError naming the URL,
    and so is one that prints nothing for `stall_timeout` seconds (`pipe_timeout`: $DHO_PIPE_TIMEOUT,
    default 300), which is then killed. A reader that stops early ends the command."""
    if not is_url(path):
        local = path[len(FILE):] if isinstance(path, str) and path.startswith(FILE) else path
        try:
            f = open(local, "rb")
        except FileNotFoundError:
            raise DatasetError(f"shard {path} not found; check the path, or restore the shard") from None
        with f:
            yield f
        return
    timeout = pipe_timeout(stall_timeout)
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty command cannot block on it
        proc = subprocess.Popen(path[len(PIPE):], shell=True, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
        stream = _StallGuard(proc.stdout, path, timeout)
        try:
            yield stream
            while stream.read(1 << 20):  # the rest (a tar's zero padding), so the command ends by itself
                pass
        except Exception:
            # an empty or cut stream is most often a command that failed: then that is the error to report
            try:
                status = proc.wait(timeout=1)
            except subprocess.TimeoutExpired:  # still printing: the stream itself was bad
                status = 0
                _kill(proc)
            proc.stdout.close()
            _check_command(path, status, stderr)
            raise
        except BaseException:  # the reader stopped early (GeneratorExit) or Ctrl-C
            _kill(proc)
            proc.stdout.close()
            raise
        proc.stdout.close()
        _check_command(path, proc.wait(), stderr)


def _kill(proc: subprocess.Popen) -> None:
    """Kill a `pipe:` command: its shell and the shell's children (a shell that does not exec the command, as
    dash does not, would leave a stalled command running, orphaned)."""
    children = []
    with contextlib.suppress(OSError):  # /proc: Linux; elsewhere the shell alone
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{entry.name}/stat", "rb") as f:
                        if int(f.read().rsplit(b")", 1)[1].split()[1]) == proc.pid:  # field 4: the parent's pid
                            children.append(int(entry.name))
    proc.kill()
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    proc.wait()


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


def file_sha256(path: str | Path, block: int = 1 << 24) -> str:
    """sha256 of a file, streamed in 16 MiB blocks (shards and checkpoints can be several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


_INT_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")  # {FIRST..LAST[..STEP]}: its size without expanding it


def expand_braces(pattern: str) -> list[str]:
    """The names a shard pattern stands for, by the `braceexpand` package (webdataset's; backslashes are not
    escapes): `{000..099}` is a range, both ends included, zero-padded to the wider end when either end starts
    with 0, counting down when the first is larger, `{0..100..10}` with a step, `{a..e}` of letters; `{a,b}` is a
    list whose items may hold groups; several groups combine left to right, the first varying slowest. A group
    that is neither (`{}`, `{x}`) stays as it is. In a `pipe:` command the braces inside quotes and in a shell
    `${...}` are the command's own (awk's `'{print $1,$2}'`, `${HOME}`) and stay as written, except an integer
    range (`'https://host/s-{000..099}.tar'` still expands). A brace without its partner, a range that is not
    one (`{1..x}`) or more than MAX_EXPANSION names is a DatasetError."""
    from braceexpand import UnbalancedBracesError, braceexpand

    text = _protect_command_braces(pattern) if is_url(pattern) else pattern
    for a, b, step in _INT_RANGE.findall(text):  # braceexpand builds a range's names whole: a huge one takes minutes
        if abs(int(b) - int(a)) // max(abs(int(step or 1)), 1) + 1 > MAX_EXPANSION:
            raise DatasetError(f"shard pattern {pattern!r} expands to more than {MAX_EXPANSION} names; check its ranges")
    try:
        names = list(itertools.islice(braceexpand(text, escape=False), MAX_EXPANSION + 1))
    except UnbalancedBracesError:
        raise DatasetError(f"shard pattern {pattern!r} has unbalanced braces; close every {{ with a }}") from None
    if len(names) > MAX_EXPANSION:
        raise DatasetError(f"shard pattern {pattern!r} expands to more than {MAX_EXPANSION} names; check its ranges")
    for name in names:
        if (bad := _NOT_A_RANGE.search(name)) is not None:  # braceexpand keeps {1..x} as it is: a typo, not a file name
            raise DatasetError(f"shard pattern {pattern!r}: {bad.group(0)} is not a range of integers or of letters; write it as {{FIRST..LAST}} "
                               "(e.g. {000000..000099}) or list the names as {a,b,c}")
    return [name.translate(_UNPROTECT) for name in names]


_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters standing in for a command's own braces while expanding
_UNPROTECT = str.maketrans({_OPEN: "{", _CLOSE: "}"})
_NOT_A_RANGE = re.compile(r"\{[^{},]*\.\.[^{},]*\}")  # a {..} group braceexpand left unexpanded
_PROTECTED_RANGE = re.compile(_OPEN + r"(-?\d+\.\.-?\d+(?:\.\.-?\d+)?)" + _CLOSE)


def _protect_command_braces(command: str) -> str:
    """`command` with the braces inside quotes and in `${...}` replaced by placeholders (integer ranges excepted),
    so braceexpand expands only the shard pattern's own groups (see `expand_braces`)."""
    out, quote, param, i = [], None, 0, 0  # param: the depth inside ${...}
    while i < len(command):
        ch = command[i]
        if quote != "'" and ch == "\\" and i + 1 < len(command):  # the shell's escape: the next character as it is
            out.append(ch + command[i + 1].translate({ord("{"): _OPEN, ord("}"): _CLOSE}))
            i += 2
            continue
        if ch in "'\"" and param == 0 and quote in (None, ch):
            quote = None if quote == ch else ch
        elif ch == "$" and quote != "'" and command[i + 1:i + 2] == "{":
            out.append("$" + _OPEN)
            param, i = param + 1, i + 2
            continue
        elif ch == "{" and (quote or param):
            ch, param = _OPEN, param + 1 if param else 0
        elif ch == "}" and (quote or param):
            ch, param = _CLOSE, param - 1 if param else 0
        out.append(ch)
        i += 1
    return _PROTECTED_RANGE.sub(r"{\1}", "".join(out))


# --------------------------------------------------------------------------------------------
# reading: tar members grouped into samples
# --------------------------------------------------------------------------------------------


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
    try:
        with open_shard(path) as f, tarfile.open(fileobj=f, mode="r|*") as stream:
            yield from _group_members(stream, path)
    except (tarfile.TarError, EOFError) as e:
        raise DatasetError(f"shard {path}: not a readable tar file ({e}); check or re-create it") from e


def _group_members(stream: tarfile.TarFile, where) -> Iterator[dict]:
    current: Optional[dict] = None
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
            raise DatasetError(f"shard {where}: sample {key!r} has two {ext!r} members; fix the shard")
        current[ext] = data
    if current is not None:
        yield current


def span_samples(raw: bytes, where) -> list[dict]:
    """The samples (as `tar_samples` gives them) in `raw`, the bytes of whole tar members copied from a shard
    (a sample's byte span); [] when they are not tar members."""
    try:
        with tarfile.open(fileobj=io.BytesIO(raw + b"\0" * (2 * tarfile.BLOCKSIZE)), mode="r|") as stream:
            return list(_group_members(stream, where))
    except (tarfile.TarError, EOFError):
        return []


def sample_digest(sample: dict) -> int:
    """crc32 of a sample's members (`tar_samples`' dict): each extension, its length and its bytes, in sorted
    order. Independent of the tar headers, so a sample copied or re-written with the same members keeps it;
    zlib's crc32 runs at several GB/s (about 30 us for a 100 KB JPEG)."""
    crc = 0
    for ext in sorted(k for k in sample if k != "__key__"):
        data = sample[ext]
        crc = zlib.crc32(data, zlib.crc32(ext.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"), crc))
    return crc


# --------------------------------------------------------------------------------------------
# writing: deterministic tars, hashed while written
# --------------------------------------------------------------------------------------------


class _HashedFile:
    """A file opened for writing that hashes (sha256) what is written to it: a shard is never read back."""

    def __init__(self, path: Path):
        self.file, self.sha256, self.size, self.failed = open(path, "wb"), hashlib.sha256(), 0, False

    def write(self, data: bytes) -> int:
        if self.failed:  # tarfile's finaliser flushing into a file that failed (a full disk): its error was raised once
            return len(data)
        self.sha256.update(data)
        self.size += len(data)
        try:
            return self.file.write(data)
        except OSError:
            self.failed = True
            raise

    def close(self) -> None:
        self.file.close()


class ShardWriter:
    """Deterministic webdataset shards: fixed mtime/owner/mode, PAX headers (non-ASCII names)."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.entries: list[dict] = []
        self.file = self.tar = None

    def write(self, key: str, ext: str, data: bytes, label: int, file: Optional[str] = None,
              source_index: Optional[int] = None) -> None:
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
        e["digests"].append(sample_digest(members))
        if file is not None:
            e.setdefault("files", []).append(file)
        if source_index is not None:
            e.setdefault("source_index", []).append(int(source_index))

    def _roll(self) -> None:
        self._close_current()
        name = f"shard-{len(self.entries):06d}.tar"
        self.file = _HashedFile(self.folder / name)
        self.tar = tarfile.open(fileobj=self.file, mode="w|")  # PAX (the default): non-ASCII names
        self.entries.append({"path": name, "count": 0, "sha256": "", "size": 0, "keys": [], "labels": [], "spans": [],
                             "digests": []})

    def _close_current(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.file.close()
            self.entries[-1].update(sha256=self.file.sha256.hexdigest(), size=self.file.size)
            self.tar = self.file = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.entries


class CopyWriter:
    """Shards made of samples copied byte for byte from other tars (their header and data blocks), closed
    as tarfile closes a stream: two zero blocks, then zeros up to a whole record. A copy of samples that
    `ShardWriter` wrote is the file `ShardWriter` would write; the same entries (count, keys, labels,
    files, spans, digests (the caller's, checked against the source), sha256 computed while writing)."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.entries: list[dict] = []
        self.file = None

    def copy(self, key: str, label: int, raw: bytes, digest: int, file: Optional[str] = None) -> None:
        if self.file is None or self.entries[-1]["count"] == self.shard_size:
            self._roll()
        e = self.entries[-1]
        e["spans"].append((self.offset, self.offset + len(raw)))
        self._write(raw)
        e["count"] += 1
        e["keys"].append(key)
        e["labels"].append(int(label))
        e["digests"].append(int(digest))
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
        self.entries.append({"path": name, "count": 0, "sha256": "", "size": 0, "keys": [], "labels": [], "spans": [],
                             "digests": []})

    def _close_current(self) -> None:
        if self.file is not None:
            self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
            self._write(b"\0" * (-self.offset % tarfile.RECORDSIZE))
            self.file.close()
            self.entries[-1].update(sha256=self.hash.hexdigest(), size=self.offset)
            self.file = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.entries

