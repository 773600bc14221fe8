"""Versioned schemas of the dho teacher cache (see README.md in this folder).

`v1.json`, `v2.json`, ... are JSON Schemas (draft 2020-12) of the cache's group attributes plus, under the
custom keyword `x-dho-arrays`, the table of arrays (dtype, symbolic shape and chunks). A change
of meaning of any array or attribute means a new version file, never an edit of an old one.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

SCHEMA_NAME = "dho-teacher-cache"
CURRENT_VERSION = 7
KNOWN_VERSIONS = (1, 2, 3, 4, 5, 6, 7)


@lru_cache(maxsize=None)
def load_schema(version: int = CURRENT_VERSION) -> dict:
    """The JSON Schema document of cache schema `version` (a dict; do not modify it)."""
    if version not in KNOWN_VERSIONS:
        raise ValueError(f"unknown cache schema version {version!r}; known: {', '.join(map(str, KNOWN_VERSIONS))}")
    text = resources.files(__name__).joinpath(f"v{version}.json").read_text(encoding="utf-8")
    return json.loads(text)
