"""Teacher ensembles in one cache (`dho merge-caches`): the caches of several teachers on one dataset and one set of
views merged into one store (cache schema v6) that holds each teacher's own probabilities (and image embeddings,
when every source has them) and their mean, as Dataset Reinforcement stores an ensemble's averaged outputs
(Faghri et al. 2023, apple/ml-dr; DataCompDR keeps each teacher's embeddings apart).

    merge_caches(["A.zarr", "B.zarr"], "ENS.zarr")   # members named "A" and "B" (the folder names) unless `names`

The mean is the arithmetic mean of the members' tempered probabilities at the caches' common eta,
`p_mean = 1/T sum_t softmax(l_t / (zeta eta))` (what ml-dr averages: the teachers' softmax outputs, not their
logits), computed in float64 from the stored float16 rows and stored as float16. Re-tempering stays exact per
teacher: a member read at eta' is `retemper(p_t, eta / eta')`, and the mean read at eta' is the mean of the members
re-tempered (`TeacherCache.probs`), i.e. the mean a merge of caches made at eta' would store; the stored mean itself
is never re-tempered (a power of a mean is not the mean of the powers).

What must agree (else a one-line CacheError naming the attribute): dataset (fingerprint, keys, labels, shards,
class list), views (number, center view, seed, the stored crop boxes unit by unit), eta, zeta, prompt templates and
the class-name rule, readable samples (`valid`), dense storage (a top-k cache is refused). What may differ: the
teacher (model, weights), its preprocessing, precision, text classifier and its norm, its embedding width.

Crash safety: the store is built whole under a hidden sibling of `--out` (`dho.atomic.temp_sibling`, removed by the
next writer when its process is gone) and renamed into place once complete, so `--out` never holds a half-written
cache; an existing `--out` is refused and the sources are opened read-only.

Out of scope: top-k caches, resuming a killed merge (it starts again: the merge reads, it computes nothing),
ensembles of ensembles, weighted means.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from dho.atomic import disk_errors, fsync, guard_out, remove_stale, temp_sibling
from dho.cache import MEMBER_ATTRS, PARAM_KEYS, TeacherCache, prompt_names
from dho.cache_layout import dataset_mismatch
from dho.errors import CacheError, ConfigError

# attributes every member must share: the dataset, the views, the temperature, the prompts
SHARED = ("dataset_fingerprint", "num_samples", "classnames", "shard_counts", "chunk_len", "num_views", "center_view",
          "seed", "eta", "zeta", "templates")
NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


def member_name(path: Path) -> str:
    """A member's default name: its cache folder's name without `.zarr` (`caches/vit-l14.zarr` -> `vit-l14`)."""
    name = Path(path).name
    return name[:-5] if name.endswith(".zarr") else name


def mean_probs(members: Sequence[np.ndarray]) -> np.ndarray:
    """(T, n, C) -> (n, C) float32: the arithmetic mean of the members' probabilities, in float64 (NaN rows of
    unreadable samples stay NaN)."""
    return np.mean(np.stack(members), axis=0, dtype=np.float64).astype(np.float32)


def ensemble_identity(members: list[dict]) -> dict:
    """The top-level `teacher` of an ensemble cache: names and hashes that change when any member does."""
    digest = lambda key: hashlib.sha256("\n".join(f"{m['name']}:{m['teacher'][key]}" for m in members).encode()).hexdigest()  # noqa: E731
    return {"model": "ensemble(" + "+".join(m["name"] for m in members) + ")", "pretrained": "mean",
            "weights_sha256": digest("weights_sha256"), "model_config_sha256": digest("model_config_sha256"),
            "prompt_names": members[0]["teacher"]["prompt_names"]}


def _open_source(path: Path) -> TeacherCache:
    cache = TeacherCache.open(path)
    if cache.is_ensemble:
        raise CacheError(f"{path} is already an ensemble ({', '.join(cache.teacher_names)}); merge the single-teacher caches instead")
    if not cache.is_complete():
        raise CacheError(f"{path} is incomplete (see `dho cache-info {path}`); finish it with its `dho precompute-teacher` command first")
    if cache.topk is not None:
        raise CacheError(f"{path} is a top-{cache.topk} cache; merge-caches merges dense caches (precompute without --topk)")
    cache.check_arrays()
    return cache


def _check_same(paths: list[Path], caches: list[TeacherCache]) -> None:
    first, a = paths[0], caches[0].attrs
    for path, cache in zip(paths[1:], caches[1:]):
        b = cache.attrs
        mismatch = dataset_mismatch(a, b["classnames"], b["num_samples"], b["shard_counts"])
        if mismatch is not None:
            raise CacheError(f"{path} and {first} were made on different datasets ({mismatch}); merge caches of one dataset")
        for k in SHARED:
            if json.dumps(a[k], sort_keys=True) != json.dumps(b[k], sort_keys=True):
                what = {"dataset_fingerprint": "datasets (content fingerprints differ)", "num_views": "numbers of views",
                        "center_view": "center-view settings", "seed": "view seeds (other crops)"}.get(k, f"{k} ({a[k]!r:.60} vs {b[k]!r:.60})")
                raise CacheError(f"{path} and {first} were made with different {what}; merge caches of one dataset made "
                                 "with the same views (--views, --center-view, --seed), --eta, --zeta and templates")
        if prompt_names(a) != prompt_names(b):
            raise CacheError(f"{path} and {first} put the class names into the prompts by different rules (an older dho's "
                             "cache has them as given): rebuild the older one with `dho precompute-teacher`")
        if not np.array_equal(cache.labels, caches[0].labels) or cache.keys != caches[0].keys:
            raise CacheError(f"{path} and {first} hold different samples or labels; merge caches of one dataset")
        if not np.array_equal(cache.valid, caches[0].valid):
            i = int(np.flatnonzero(cache.valid != caches[0].valid)[0])
            raise CacheError(f"{path} and {first} disagree on which samples are readable (sample {cache.keys[i]!r}); "
                             "make both with the same --skip-bad setting on the same files")
    seen: dict = {}
    for path, cache in zip(paths, caches):
        ident = json.dumps({k: cache.attrs[k] for k in MEMBER_ATTRS if k not in ("store_embeddings",)}, sort_keys=True)
        if ident in seen:
            raise CacheError(f"{path} and {seen[ident]} were made by the same teacher with the same settings; an ensemble "
                             "needs different teachers")
        seen[ident] = path


def merge_caches(sources: Sequence, out, names: Optional[Sequence[str]] = None,
                 log: Callable[[str], None] = lambda m: None) -> TeacherCache:
    """Merge the complete dense caches `sources` (two or more teachers, one dataset, one set of views) into the new
    ensemble cache `out` (schema v6); returns it opened read-only. `names` name the members (default: the folder
    names), as `dho distill --teacher NAME` selects them."""
    paths, out = [Path(s) for s in sources], Path(out)
    if len(paths) < 2:
        raise ConfigError(f"merge-caches needs two or more caches (got {len(paths)})")
    names = [member_name(p) for p in paths] if names is None else [str(n) for n in names]
    if len(names) != len(paths):
        raise ConfigError(f"--names gives {len(names)} names for {len(paths)} caches; give one per cache, in order")
    bad = next((n for n in names if not NAME.match(n) or n.isdigit() or n == "mean"), None)
    if bad is not None:
        raise ConfigError(f"teacher name {bad!r}: use letters, digits and . _ + - (not only digits, not 'mean'); set --names")
    if len(set(names)) != len(names):
        raise ConfigError(f"the teachers' names {names} repeat; give distinct ones with --names A,B,...")
    guard_out(out, overwrite=False, what="ensemble cache", sources=paths)
    if out.exists():
        raise ConfigError(f"--out {out} exists; merge-caches writes a new cache, choose another --out")
    caches = [_open_source(p) for p in paths]
    _check_same(paths, caches)
    store_embeddings = all(c.has_embeddings for c in caches)
    if not store_embeddings and any(c.has_embeddings for c in caches):
        log("note: not every cache has teacher embeddings, so the ensemble keeps none (feature-KD methods need them)")
    members = [{"name": n, **{k: c.attrs[k] for k in MEMBER_ATTRS}, "store_embeddings": store_embeddings,
                "source": {"path": str(p), "schema_version": c.attrs["schema_version"], "dho_version": c.attrs["dho_version"],
                           "created_at": c.attrs["created_at"]}}
               for n, p, c in zip(names, paths, caches)]
    for m in members:
        m["teacher"] = {**m["teacher"], "prompt_names": prompt_names(caches[0].attrs)}  # v1-v4: the rule in effect
    first = caches[0].attrs
    attrs = {k: first[k] for k in PARAM_KEYS if k in first}
    attrs.update({"teacher": ensemble_identity(members), "topk": None, "store_embeddings": False, "teachers": members,
                  "text_classifier_norm": members[0]["text_classifier_norm"], "preprocess": members[0]["preprocess"],
                  "precision": members[0]["precision"], "embed_dim": members[0]["embed_dim"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # hidden folders of merges that were killed
    tmp = temp_sibling(out, "creating")
    try:
        with disk_errors(out):
            TeacherCache._create(tmp, attrs, caches[0].keys, caches[0].labels, [c.text_classifier for c in caches])
            ens = TeacherCache.open(tmp, mode="r+")
            _copy_units(caches, ens, paths, log)
            if not ens.finalize():
                raise CacheError(f"{tmp}: the merged cache has units left undone; run merge-caches again")
            for f in sorted(tmp.rglob("zarr.json")):
                fsync(f)
            os.rename(tmp, out)  # the whole store appears at once
            fsync(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return TeacherCache.open(out)


def _copy_units(caches: list[TeacherCache], ens: TeacherCache, paths: list[Path], log: Callable[[str], None]) -> None:
    """Every (view, shard) unit: the members' rows as stored (float16 -> float32 -> float16 is exact), their mean,
    and the crop boxes, which must be the same in every source."""
    shards = len(ens.shard_counts)
    for shard in range(shards):
        start, stop = ens.shard_range(shard)
        ens.write_valid(shard, caches[0].valid[start:stop])
        for view in range(ens.num_views):
            params = caches[0].view_params(view, start, stop)  # (n, 5)
            for path, cache in zip(paths[1:], caches[1:]):
                other = cache.view_params(view, start, stop)
                if not np.array_equal(other, params):
                    row = int(np.flatnonzero((other != params).any(axis=1))[0])
                    raise CacheError(f"{path} and {paths[0]} show other crops in view {view} (sample {cache.keys[start + row]!r}: "
                                     f"{other[row].tolist()} vs {params[row].tolist()}); merge caches made with the same views")
            own = [{"probs": c.probs(view, start, stop)} for c in caches]  # (n, C) float32 each
            if ens.members[0]["store_embeddings"]:
                for o, c in zip(own, caches):
                    o["embeddings"] = c.embeddings(view, start, stop)  # (n, D_t)
            ens.write_unit(view, shard, view_params=params, probs=mean_probs([o["probs"] for o in own]), members=own)
        log(f"merged shard {shard + 1}/{shards}")
