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
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from dho.errors import ConfigError

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


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        remove_stale(p)
    stage = temp_sibling(paths[0], "tmp")
    stage.mkdir()
    try:
        parts = [stage / f"{p.name}.part" for p in paths]
        yield parts
        for part, path in zip(parts, paths):
            if durable:
                fsync(part)
            os.replace(part, path)
        if durable:
            fsync(folder)
    finally:
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
        for out in outs:
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(out)
            tmps.append(temp_sibling(out, "tmp"))
            tmps[-1].mkdir()
        yield list(tmps)
        for tmp, out in zip(tmps, outs):
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
