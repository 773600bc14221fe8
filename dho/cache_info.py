"""What `dho cache-info` prints about a teacher cache: teacher, views, coverage, valid samples, size on disk
and the teacher's top-1 agreement with the labels (`summarize`, `format_summary`).

It reads through `dho.cache.TeacherCache` only (no zarr here). `dho cache-info --verify` adds
`TeacherCache.verify_arrays()`'s damaged arrays and `verify_units()`'s damaged units to the summary.

Out of scope: comparing two caches, per-class statistics.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dho.cache import TeacherCache, densify_topk


def disk_size(path: Path) -> int:
    """Bytes of all files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def file_count(path: Path) -> int:
    """Files under `path` (what a file system's inode quota counts)."""
    return sum(len(files) for _, _, files in os.walk(path))


def summarize(path) -> dict:
    """What `dho cache-info` prints: teacher, views, coverage, valid samples, size, teacher/label agreement."""
    cache = TeacherCache.open(path)
    a = cache.attrs
    done = cache.done  # (V, S)
    valid = cache.valid  # (N,)
    labels = cache.labels  # (N,)
    view = cache.num_views - 1 if a["center_view"] else 0
    agree, counted = 0, 0
    for start, stop in _blocks(cache, done[view]):
        mask = valid[start:stop] & (labels[start:stop] >= 0)
        if mask.any():
            pred = top1(cache, view, start, stop)
            agree += int((pred[mask] == labels[start:stop][mask]).sum())
            counted += int(mask.sum())
    members = []
    for i, m in enumerate(cache.members):  # an ensemble (schema v6): each teacher's own agreement with the labels
        cache.select(i)
        hits = sum(int((top1(cache, view, start, stop)[mask] == labels[start:stop][mask]).sum())
                   for start, stop in _blocks(cache, done[view])
                   for mask in [valid[start:stop] & (labels[start:stop] >= 0)])
        members.append({**m, "agreement": hits / counted if counted else None})
    cache.select("mean")
    samples_done = int(sum(c for c, d in zip(cache.shard_counts, done.all(axis=0)) if d))
    started = _shard_rows(cache, done.any(axis=0))  # (N,) rows of shards with any unit done
    return {
        "path": str(cache.path),
        "schema_version": a["schema_version"],
        "dho_version": a["dho_version"],
        "created_at": a["created_at"],
        "teacher": a["teacher"],
        "teachers": members,  # [] for a single-teacher cache
        "precision": a["precision"],
        "templates": a["templates"],
        "text_classifier_norm": a["text_classifier_norm"],
        "prompt_names": cache.prompt_names,
        "preprocess": a["preprocess"],
        "zeta": a["zeta"],
        "eta": a["eta"],
        "num_views": cache.num_views,
        "center_view": a["center_view"],
        "seed": a["seed"],
        "topk": a["topk"],
        "store_embeddings": a["store_embeddings"],
        "num_samples": cache.num_samples,
        "num_classes": cache.num_classes,
        "num_shards": len(cache.shard_counts),
        "chunk_len": cache.chunk_len,
        "shard_group": cache.shard_group,
        "units_done": int(done.sum()),
        "units_total": int(done.size),
        "samples_all_views_done": samples_done,
        "valid_samples": int((valid & started).sum()),
        "invalid_samples": int((~valid & started).sum()),
        "complete": cache.is_complete(),
        "size_bytes": disk_size(cache.path),
        "num_files": file_count(cache.path),
        "agreement_view": view,
        "agreement": agree / counted if counted else None,
        "agreement_count": counted,
    }


def top1(cache: TeacherCache, view: int, start: int, stop: int) -> np.ndarray:
    """(n,) the teacher's top-1 class of rows [start, stop): `cache.probs(...).argmax(axis=1)`, in O(n K) for a
    top-k cache instead of O(n C): the densified row's first maximum is the smallest stored class index holding
    the largest stored value, unless the remainder spread over the other C - K classes reaches that value (rows
    near uniform), which are densified. Dense caches: the argmax of `probs`, one shard-aligned chunk at a time."""
    if cache.topk is None:
        return cache.probs(view, start, stop).argmax(axis=1)
    idx, val = cache.topk_rows(view, start, stop)  # (n, K) int64, float32; NaN rows of invalid samples
    best = val.max(axis=1)  # (n,)
    pred = np.where(val == best[:, None], idx, np.iinfo(np.int64).max).min(axis=1)  # (n,)
    pred[np.isnan(best)] = 0  # densify keeps an invalid row NaN: its argmax is 0
    rest = cache.num_classes - val.shape[1]
    if rest > 0:
        fill = np.clip(1.0 - val.sum(axis=1), 0.0, None) / rest  # (n,) float32, what densify_topk gives the others
        odd = np.flatnonzero(fill >= best)
        if len(odd):
            pred[odd] = densify_topk(idx[odd], val[odd], cache.num_classes).argmax(axis=1)
    return pred


def _blocks(cache: TeacherCache, shard_done: np.ndarray) -> list[tuple[int, int]]:
    """Rows [start, stop) of the runs of done shards within one Zarr shard (a group of `shard_group` shards): one
    read each instead of one per dataset shard (zarr's per-call cost dominates a top-k cache's small chunks)."""
    blocks: list[tuple[int, int]] = []
    for s in np.flatnonzero(shard_done):
        start, stop = cache.shard_range(int(s))
        if blocks and blocks[-1][1] == start and cache.shard_owner(int(s)) == cache.shard_owner(int(s) - 1):
            blocks[-1] = (blocks[-1][0], stop)
        else:
            blocks.append((start, stop))
    return blocks


def _shard_rows(cache: TeacherCache, shard_done: np.ndarray) -> np.ndarray:
    rows = np.zeros(cache.num_samples, dtype=bool)
    for s in np.flatnonzero(shard_done):
        start, stop = cache.shard_range(int(s))
        rows[start:stop] = True
    return rows


def format_summary(info: dict) -> str:
    """Human-readable lines of `summarize` (the output of `dho cache-info`)."""
    t, pp = info["teacher"], info["preprocess"]
    storage = "dense probs (float16)" if info["topk"] is None else f"top-{info['topk']} (indices int32 + probs float16)"
    if info["store_embeddings"]:
        storage += " + embeddings"
    views = f"{info['num_views']}" + (" (last = center view)" if info["center_view"] else "")
    pct = 100.0 * info["units_done"] / info["units_total"]
    if info["agreement"] is None:
        agree = "n/a (no labeled samples computed)"
    else:
        which = "center view" if info["center_view"] else "view 0"
        agree = f"{100.0 * info['agreement']:.2f}% on {info['agreement_count']} labeled valid samples ({which})"
    members = info.get("teachers") or []
    if members:
        storage = "dense probs (float16): the mean and each teacher's" + (" + each teacher's embeddings" if members[0]["store_embeddings"] else "")
    lines = [
        f"cache:      {info['path']} (schema v{info['schema_version']}, dho {info['dho_version']}, created {info['created_at']})",
        f"teacher:    {t['model']} / {t['pretrained']} (weights sha256 {t['weights_sha256'][:16]}...), precision {info['precision']}"
        if not members else f"teachers:   {len(members)}, their mean in probs (arithmetic, at eta={info['eta']}); "
                            "`dho distill --teacher mean | INDEX | NAME`",
    ]
    for i, m in enumerate(members):
        mt, mp = m["teacher"], m["preprocess"]
        agree_m = "n/a" if m["agreement"] is None else f"{100.0 * m['agreement']:.2f}%"
        lines.append(f"  [{i}] {m['name']}: {mt['model']} / {mt['pretrained']} (weights sha256 {mt['weights_sha256'][:16]}...), "
                     f"precision {m['precision']}, {mp['image_size']}px {mp['interpolation']}, {m['text_classifier_norm']}, "
                     f"D={m['embed_dim']}{' + embeddings' if m['store_embeddings'] else ''}; top-1 vs labels {agree_m}")
    lines += [
        f"classifier: {len(info['templates'])} templates ({'' if members else info['text_classifier_norm'] + ', '}class names {info['prompt_names']}), zeta={info['zeta']} "
        f"(logit scale {1.0 / info['zeta']:g}), eta={info['eta']}",
        *([] if members else [f"preprocess: {pp['image_size']}px {pp['interpolation']} resize_mode={pp['resize_mode']} mean={pp['mean']} std={pp['std']} ({pp['source']})"]),
        f"views:      {views}, seed {info['seed']}; storage: {storage}",
        f"data:       {info['num_samples']} samples, {info['num_classes']} classes, {info['num_shards']} shards, chunk length {info['chunk_len']}, "
        f"{info['shard_group']} shard(s) per Zarr shard",
        f"coverage:   {info['units_done']}/{info['units_total']} units done ({pct:.1f}%), complete: {'yes' if info['complete'] else 'no'}"
        + ("" if "verified" in info else " (chunks not read; --verify reads and checks every one)"),
        f"samples:    {info['samples_all_views_done']}/{info['num_samples']} with all views done, "
        f"{info['valid_samples']} valid, {info['invalid_samples']} invalid (unreadable, NaN rows)",
        f"size:       {info['size_bytes'] / 2**20:.2f} MiB on disk in {info['num_files']} files",
        f"agreement:  {'the mean' if members else 'teacher'} top-1 vs labels {agree}",
    ]
    if "verified" in info:
        v = info["verified"]
        damaged = ", ".join(f"{n} damaged {what}(s)" for n, what in ((v.get("damaged_arrays", 0), "array"), (v["damaged_units"], "unit")) if n)
        intact = "keys, labels, valid, done, text_classifier and every chunk of every finished unit read back intact"
        lines.append(f"verified:   {damaged or intact}")
        lines += [f"  damaged: {p}" for p in info["verified"]["problems"][:20]]
    return "\n".join(lines)
