"""What the `make reproduce-*` report scripts share: reading a stage's JSON, number cells, writing the table."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def read_json(path: Path, target: str) -> dict:
    """A stage's JSON output; a missing or broken file is one line naming it and the make target to run."""
    if not path.is_file():
        sys.exit(f"error: {path} not found; run `make {target}` (it makes every input of the table)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        sys.exit(f"error: {path} is not JSON ({e}); delete it and re-run `make {target}`")


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def write_text_atomic(out: Path, text: str) -> None:
    """Write a report file atomically: a stopped report never leaves a partial one."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)


def write_table(out: Path, table: str) -> None:
    """Write the Markdown table atomically (a stopped report never leaves a partial table.md) and print it."""
    write_text_atomic(out, table)
    print(table, end="")
