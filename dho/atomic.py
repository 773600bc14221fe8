"""Outputs that appear whole or not at all, the leftovers of killed writers, and what --overwrite may replace.

Every command that writes a folder or a file builds it under a hidden sibling name stamped with
its process id, `.NAME.<kind>-<pid>-<nonce>` (kind: tmp, old, creating), and renames it into place
when it is complete. A writer killed half-way leaves such a sibling behind; the next writer of the
same output removes the siblings whose process is gone (`remove_stale`), never one of a live process.

The two ways to use it:
- files: `write_atomic(path, write)` for one file, `replace_files(*paths)` for files that are replaced
  together (an export: the model, its weights, its JSON last). Each is written as `NAME.part` inside a
  hidden staging folder `.NAME.tmp-<pid>-<nonce>` beside it, then renamed over NAME; the writer sees a
  file called `NAME.part`, so formats that record their own file name (torch.save takes the folder
  name inside its zip from it) write the same bytes whatever the stamp. `durable` fsyncs (checkpoints).
- folders: `replace_folders(*outs)` yields fresh hidden siblings to build the outputs in and, when the
  block ends without an error, swaps each into place with renames (a dataset; a split and its
  validation split together). On an error nothing of the outputs changes.

`--overwrite` replaces an output only when it holds what this kind of command writes (`guard_out`):
never a source, a folder inside a source or one that contains it, and never a folder with files the
command did not write. Out of scope: remote or object stores (rename and pid checks need a local path).

Every output file gets the mode a plain `open()` gives it, 0666 & ~umask (`as_created`), whatever its writer did:
safetensors (its Rust writer goes through a temporary file) creates 0600, which other users of a shared model folder
could not read. Execute bits a writer set are kept.

A write that fails for the disk's sake (full, read-only, over quota, not permitted) is one ConfigError naming the
output (`disk_error`), also for writers that hide the OS error (torch's zip writer says "unexpected pos", numpy's
"requested and 0 written"): then the folder itself is asked (statvfs). `check_space` refuses a write whose size is
known before it starts; torch's C++ writers abort the process on a full disk, so they write into memory first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from dho.errors import ConfigError

LOW_SPACE = 1 << 20  # bytes: a write that failed in a folder with less free than this failed for want of space
_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
_STAMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|creating)-(?P<pid>\d+)-[0-9a-f]+$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_sibling(out: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside `out` for building it: `.NAME.<kind>-<pid>-<nonce>`."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of `out` left by writers that no longer run; return them."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = _STAMP.match(p.name)
        if m is None or m.group("name") != out.name or int(m.group("pid")) == os.getpid() or pid_alive(int(m.group("pid"))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def umask() -> int:
    """The process's umask, read from /proc where Linux lists it (setting it to read it would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_created(path: Path) -> None:
    """Give the regular files at `path` (a file, or every file below a folder) the mode `open()` would: 0666 & ~umask,
    plus the execute bits their writer set (within the umask). Symbolic links are left alone."""
    mask = umask()
    paths = [Path(path)]
    if paths[0].is_dir() and not paths[0].is_symlink():
        paths = [Path(root) / name for root, _, names in os.walk(path) for name in names]
    for p in paths:
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        wanted = (0o666 | (mode & 0o111)) & ~mask
        if mode != wanted:
            os.chmod(p, wanted)


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _free(folder: Path) -> tuple[int, bool]:
    """(free bytes, read-only?) of the file system holding `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize, bool(st.f_flag & os.ST_RDONLY)


def disk_error(exc: BaseException, target: Path) -> Optional[ConfigError]:
    """The one-line error for a write of `target` that failed because of the disk, or None (another failure)."""
    def ours(e: OSError) -> bool:  # a permission error reading a source is not the output's
        return e.errno not in (errno.EACCES, errno.EPERM) or str(e.filename or "").startswith(str(Path(target).parent))

    reason = next((_REASONS[e.errno] for e in (exc, exc.__cause__, exc.__context__)
                   if isinstance(e, OSError) and e.errno in _REASONS and ours(e)), None)
    try:
        free, read_only = _free(Path(target).parent)
    except OSError:
        free, read_only = None, False
    if reason is None and read_only:
        reason = _REASONS[errno.EROFS]
    if reason is None and free is not None and free < LOW_SPACE and isinstance(exc, (OSError, RuntimeError)):
        reason = _REASONS[errno.ENOSPC]
    if reason is None:
        return None
    if reason == _REASONS[errno.ENOSPC] or reason == _REASONS[errno.EDQUOT]:
        left = f" ({_mib(free)} free there)" if free is not None else ""
        return ConfigError(f"cannot write {target}: {reason}{left}; free some space or write to another folder")
    return ConfigError(f"cannot write {target}: {reason}; write to a folder you can write to")


def _output(path: Path) -> Path:
    """The output a part file (`NAME.part` in a staging folder of `replace_files`) becomes; else `path`."""
    path = Path(path)
    if path.name.endswith(".part") and _STAMP.match(path.parent.name):
        return path.parent.parent / path.name[:-len(".part")]
    return path


def check_space(target: Path, nbytes: int) -> None:
    """Refuse to start a write of about `nbytes` into `target`'s folder (a part file: its output is named) when
    the disk has not that much free."""
    target = _output(target)
    try:
        free, _ = _free(Path(target).parent)
    except OSError:
        return
    if free < nbytes:
        raise ConfigError(f"cannot write {target}: no space left on the device (it needs about {_mib(nbytes)}, "
                          f"{_mib(free)} free there); free some space or write to another folder")


@contextlib.contextmanager
def disk_errors(target: Path) -> Iterator[None]:
    """Turn a write's failure for the disk's sake into `disk_error`'s one line; other errors pass."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        failure = disk_error(e, target)
        if failure is None:
            raise
        raise failure from None


@contextlib.contextmanager
def replace_files(*paths: Path, durable: bool = False) -> Iterator[list[Path]]:
    """Yield one part path per output file (`NAME.part` in a hidden staging folder beside the first); when
    the block ends without an error, rename each part over its output, in the order given (put the file
    whose presence means "done" last). The outputs must share a folder. `durable`: fsync each part before
    its rename and the folder after (a crash right after leaves the new file, not an empty one)."""
    paths = [Path(p) for p in paths]
    folder = paths[0].parent
    if any(p.parent != folder for p in paths):
        raise ValueError(f"replace_files: {[str(p) for p in paths]} are not in one folder")
    stage = None
    try:
        with disk_errors(paths[0]):  # asked before the stage (which holds the space) is removed
            folder.mkdir(parents=True, exist_ok=True)
            for p in paths:
                remove_stale(p)
            stage = temp_sibling(paths[0], "tmp")
            stage.mkdir()
            parts = [stage / f"{p.name}.part" for p in paths]
            yield parts
            for part, path in zip(parts, paths):
                as_created(part)
                if durable:
                    fsync(part)
                os.replace(part, path)
            if durable:
                fsync(folder)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def write_atomic(path: Path, write: Callable[[Path], object], *, durable: bool = False) -> Path:
    """The one way to write a single file: `write(part)` writes it under a temporary name, which is then
    renamed over `path` (see `replace_files`) -> path."""
    with replace_files(path, durable=durable) as (part,):
        write(part)
    return Path(path)


@contextlib.contextmanager
def replace_folders(*outs: Path) -> Iterator[list[Path]]:
    """Yield a fresh hidden sibling folder per output (leftovers of killed writers removed first); when the
    block ends without an error each replaces its output by renames (the old one moved aside, the new one in,
    the old one removed), so an output is never half-written. On an error the siblings are removed."""
    outs = [Path(o) for o in outs]
    tmps = []
    try:
        with disk_errors(outs[0]):
            for out in outs:
                out.parent.mkdir(parents=True, exist_ok=True)
                remove_stale(out)
                tmps.append(temp_sibling(out, "tmp"))
                tmps[-1].mkdir()
            yield list(tmps)
            for tmp, out in zip(tmps, outs):
                as_created(tmp)
                old = None
                if out.exists():
                    old = temp_sibling(out, "old")
                    os.rename(out, old)
                os.rename(tmp, out)
                if old is not None:
                    shutil.rmtree(old)
    finally:
        for tmp in tmps:
            if tmp.exists():
                shutil.rmtree(tmp)


def _related(a: Path, b: Path) -> Optional[str]:
    """How folder `a` relates to folder `b`: 'is', 'inside', 'contains' or None."""
    a, b = a.resolve(), b.resolve()
    if a == b:
        return "is"
    if b in a.parents:
        return "inside"
    if a in b.parents:
        return "contains"
    return None


def guard_out(out: Path, overwrite: bool, *, what: str, sources: Iterable[Path] = (),
              owned: Optional[Callable[[Path], Optional[set]]] = None) -> None:
    """Refuse an output that would lose data. `owned(out)` returns the entry names (relative to `out`)
    of a previous output of this kind in `out`, or None when `out` holds none; only such a folder,
    with nothing else in it, may be replaced with `overwrite`."""
    for src in sources:
        relation = _related(out, Path(src)) if Path(src).exists() else None
        if relation is not None:
            where = {"is": "is", "inside": "is inside", "contains": "contains"}[relation]
            raise ConfigError(f"--out {out} {where} the source {src}; write the {what} to a folder outside it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the {what}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"--out {out} is not empty; choose another folder or pass --overwrite to replace the {what} in it")
    mine = owned(out) if owned is not None else None
    if mine is None:
        raise ConfigError(f"--overwrite: {out} does not hold a {what} written by dho; it is left alone, choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in mine)
    if foreign:
        raise ConfigError(f"--overwrite: {out} holds files that are not part of its {what} ({', '.join(foreign[:5])}"
                          f"{' ...' if len(foreign) > 5 else ''}); move them away first, dho never deletes them")
