"""Outputs that appear whole or not at all, the leftovers of killed writers, and what --overwrite may replace.

Every command that writes a folder or a file builds it under a hidden sibling name stamped with
its process id, `.NAME.<kind>-<pid>-<nonce>` (kind: tmp, old, creating), and renames it into place
when it is complete. A writer killed half-way leaves such a sibling behind; the next writer of the
same output removes the siblings whose process is gone (`remove_stale`), never one of a live process.

`--overwrite` replaces an output only when it holds what this kind of command writes (`guard_out`):
never a source, a folder inside a source or one that contains it, and never a folder with files the
command did not write. Out of scope: remote or object stores (rename and pid checks need a local path).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional

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
