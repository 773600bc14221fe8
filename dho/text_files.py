"""The one reading of a text file a user gives: class lists, keys lists, prompt templates.

`read_lines` decodes UTF-8 and drops a leading byte-order mark (which Windows editors write, and which
would otherwise become part of the first class name or key); lines end at LF, CRLF or CR. The --config
YAML file is read by PyYAML, which drops a BOM itself.
Out of scope: files dho writes (manifests, caches, run folders) and images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Type

from dho.errors import ConfigError, DhoError


def read_lines(path: Path, what: str, error: Type[DhoError] = ConfigError) -> list[str]:
    """The lines of `path` (UTF-8, a leading BOM dropped, no line ends); not UTF-8 is `error`, naming `what` and `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                    "save it as UTF-8") from None
    return text.splitlines()
