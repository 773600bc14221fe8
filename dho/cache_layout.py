"""The layout of a teacher cache, from its attributes alone: the chunk length L along the samples, the
shard group G (dataset shards per Zarr shard, schema v4) and the schema's array table resolved to numbers
(`expected_arrays`: dtype, shape, chunks, shards, fill value, dimension names of every array) and the files
of a complete store (`store_files`).

`dho.cache` creates stores with this layout and checks every store it opens against it; precompute
computes L for a new cache from the dataset's shard counts. Pure (no zarr): the schema comes from
`cache_schemas`. `read_attrs` and `dataset_mismatch` read a cache's attributes from its `zarr.json` and say
whether they belong to a dataset, so `dho distill` checks its caches before torch and zarr are imported.

Out of scope: choosing chunk lengths other than the gcd rule, layouts of other stores.
"""

from __future__ import annotations

import json
import math
from functools import reduce
from pathlib import Path
from typing import Optional

from cache_schemas import load_schema


def chunk_length(shard_counts: list[int]) -> int:
    """L = gcd of all shard counts but the last: every shard offset is a multiple of L, so each
    (view, shard) unit is whole chunks (the last shard may end in a partial chunk). With equal-sized
    shards (what `dho prepare` writes) L is the shard size and a unit is exactly one chunk."""
    if len(shard_counts) == 1:
        return int(shard_counts[0])
    return int(reduce(math.gcd, shard_counts[:-1]))


SHARD_BYTES = 1 << 20  # target uncompressed bytes of one Zarr shard (one view, G dataset shards) of the widest array


def shard_group(shard_counts: list[int], chunk_len: int, row_bytes: int) -> int:
    """G = dataset shards per Zarr shard (schema v4): as many as fit SHARD_BYTES of the widest per-view
    array (`row_bytes` per sample), when every shard but the last holds exactly L samples (what
    `dho prepare` writes), so a Zarr shard is G whole dataset shards; else 1 (a Zarr shard is then one
    chunk of L rows, inside one dataset shard). Writers own groups of G dataset shards (`shard_owner`)."""
    if len(shard_counts) == 1 or any(c != chunk_len for c in shard_counts[:-1]):
        return 1
    return int(max(1, min(SHARD_BYTES // max(1, chunk_len * row_bytes), len(shard_counts))))


def row_bytes(attrs: dict) -> int:
    """Bytes per (view, sample) of the widest per-view array of a cache with these attributes (of an ensemble
    (schema v6): also of every member's arrays, as one shard group G holds for all of them)."""
    widths = [5 * 4]  # view_params
    widths.append(len(attrs["classnames"]) * 2 if attrs["topk"] is None else attrs["topk"] * 4)
    if attrs["store_embeddings"]:
        widths.append(attrs["embed_dim"] * 2)
    for member in attrs.get("teachers") or ():
        if member["store_embeddings"]:
            widths.append(member["embed_dim"] * 2)
    return max(widths)


def _symbols(attrs: dict) -> dict:
    return {
        "V": attrs["num_views"], "N": attrs["num_samples"], "C": len(attrs["classnames"]), "K": attrs["topk"],
        "D": attrs["embed_dim"], "S": len(attrs["shard_counts"]), "L": attrs["chunk_len"],
        "W": attrs.get("key_bytes"),  # v3 and later
        "G": attrs.get("shard_group", 1), "GL": attrs.get("shard_group", 1) * attrs["chunk_len"],  # v4
    }


def member_group(index: int) -> str:
    """The subgroup that holds the own arrays of member `index` of an ensemble cache (schema v6)."""
    return f"teachers/{index}"


def expected_arrays(attrs: dict, member: Optional[int] = None) -> dict[str, dict]:
    """The schema's array table for these attributes, with symbols resolved to numbers; with `member`, the table
    of the own arrays of that member of an ensemble (schema v6 `x-dho-member-arrays`, in `member_group(member)`)."""
    sym = _symbols(attrs)
    table = "x-dho-arrays"
    store_embeddings = attrs["store_embeddings"]
    if member is not None:
        table, spec_of = "x-dho-member-arrays", attrs["teachers"][member]
        sym["D"], store_embeddings = spec_of["embed_dim"], spec_of["store_embeddings"]
    when = {
        "always": True, "topk is null": attrs["topk"] is None, "topk is not null": attrs["topk"] is not None,
        "store_embeddings": store_embeddings, "single teacher": not attrs.get("teachers"),
    }
    out = {}
    for name, spec in load_schema(attrs["schema_version"])[table].items():
        if not when[spec["when"]]:
            continue
        shape = tuple(sym[d] if isinstance(d, str) else d for d in spec["shape"])
        chunks = tuple(min(sym[d] if isinstance(d, str) else d, n) for d, n in zip(spec["chunks"], shape))
        shards = None
        if "shards" in spec:  # v4: Zarr shards of GL rows holding inner chunks of L rows
            shards = tuple(max(min(sym[d] if isinstance(d, str) else d, n), c) for d, n, c in zip(spec["shards"], shape, chunks))
            shards = tuple(-(-s // c) * c for s, c in zip(shards, chunks))  # a whole number of inner chunks
        fill = float("nan") if spec["fill_value"] == "NaN" else spec["fill_value"]
        out[name] = {"dtype": spec["dtype"], "shape": shape, "chunks": chunks, "shards": shards, "fill_value": fill,
                     "symbols": spec["shape"], "dims": tuple(spec["dims"]) if "dims" in spec else None}  # dimension_names from v3 on
    return out


def store_files(attrs: dict) -> int:
    """Files of a complete store with these attributes (every chunk is stored, schema v2 on): per array, one file
    per Zarr shard (per chunk where unsharded) and its `zarr.json`, plus the group's `zarr.json`. With S shards of
    L samples each, V views and G = `shard_group`: (A V + 4) ceil(S / G) + 1 + arrays + 1, A = the per-view arrays
    (probs + view_params: 2; top-k: 3; + embeddings)."""
    files = 1  # the group's zarr.json
    members = attrs.get("teachers") or ()
    tables = [expected_arrays(attrs)] + [expected_arrays(attrs, i) for i in range(len(members))]
    files += (1 + len(members)) if members else 0  # ensembles (v6): the zarr.json of `teachers` and of each member group
    for table in tables:
        for spec in table.values():
            per_file = spec["shards"] or spec["chunks"]
            files += 1 + math.prod(-(-n // c) for n, c in zip(spec["shape"], per_file))
    return files


def read_attrs(path) -> Optional[dict]:
    """The group attributes of the Zarr v3 store at `path` (the JSON of its `zarr.json`), or None where there is
    no readable `zarr.json` (`TeacherCache.open` then says what is wrong)."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else None


def dataset_mismatch(attrs: dict, classnames: list, num_samples: int, shard_counts: list) -> Optional[str]:
    """What differs between the dataset a cache was built for (its attributes) and a dataset with these class
    names, sample count and shard sizes, or None (the fingerprint is compared by the caller)."""
    mine = list(attrs["classnames"])
    if list(classnames) != mine:
        diff = next((i for i, (x, y) in enumerate(zip(mine, classnames)) if x != y), None)
        detail = (f"class {diff} is {mine[diff]!r} in the cache but {classnames[diff]!r} in the dataset"
                  if diff is not None else f"{len(mine)} classes in the cache, {len(classnames)} in the dataset")
        return f"another class list ({detail})"
    if num_samples != attrs["num_samples"]:
        return f"{attrs['num_samples']} samples in the cache, {num_samples} in the dataset"
    if list(shard_counts) != list(attrs["shard_counts"]):
        return f"shard sizes differ ({list(attrs['shard_counts'])[:5]}... vs {list(shard_counts)[:5]}...)"
    return None
