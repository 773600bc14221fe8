"""The checks of a `dho distill` config that need only manifests, cache attributes and the config: the CLI runs
`check_before_start` before torch is imported (seconds) and the model is built, so a misspelled student, a cache
of another dataset or a batch size the consumers cannot split fails at once, not after the start-up.

Everything here is torch-free and zarr-free: datasets are opened from their manifests (`Dataset.open`, cheap),
caches are read as the attributes in their `zarr.json` (`dho.cache_layout.read_attrs`). The full checks run
again where the data is opened for training (`dho.distill.streams.open_streams`: completeness, checksums, keys);
a cache whose `zarr.json` cannot be read is left to them, so every message stays the one they give.

Out of scope: checks that need torch or a device (--decode gpu, --precision fp16 on CPU), the run folder
(dho.run_dir) and timm model names (listing them imports torch).
"""

from __future__ import annotations

from typing import Optional

from dho import data
from dho.cache_layout import dataset_mismatch, read_attrs
from dho.devices import torchrun_env
from dho.errors import CacheError, ConfigError
from dho.names import check_student

FIX = "use the cache built for this dataset, or build one with `dho precompute-teacher`"


def check_batch_split(batch_size: int, world_size: int, workers: int, accum_steps: int) -> int:
    """The consumers (ranks x workers, each yielding one micro-batch per forward) -> their number; a batch the
    consumers and accumulation steps cannot split evenly is a ConfigError saying which sizes fit."""
    consumers = world_size * max(workers, 1)
    if batch_size % (consumers * accum_steps):
        raise ConfigError(
            f"--batch-size {batch_size} must be divisible by world_size x workers x accum_steps = "
            f"{world_size} x {max(workers, 1)} x {accum_steps}; pick a batch size that is a multiple of {consumers * accum_steps}"
        )
    return consumers


def check_cache_belongs(cache: str, dataset: data.Dataset) -> Optional[dict]:
    """The attributes of the teacher cache at `cache` (None when its zarr.json is unreadable), refused with a
    CacheError when they were written for another dataset (class list, sizes, content fingerprint)."""
    attrs = read_attrs(cache)
    if attrs is None or not {"classnames", "num_samples", "shard_counts", "dataset_fingerprint"} <= set(attrs):
        return None
    where = f"cache {cache} does not belong to dataset {dataset.root}"
    mismatch = dataset_mismatch(attrs, dataset.classnames, dataset.num_samples, [s.count for s in dataset.shards])
    if mismatch is not None:
        raise CacheError(f"{where}: {mismatch}; {FIX}")
    if attrs["dataset_fingerprint"] != dataset.fingerprint:
        raise CacheError(f"{where}: dataset fingerprint {dataset.fingerprint[:12]}... differs from the cache's "
                         f"{attrs['dataset_fingerprint'][:12]}... (other samples, labels or shard contents); {FIX}")
    return attrs


def check_before_start(cfg) -> None:
    """Check a DistillConfig (whose own checks ran when it was built) against what its names point to, torch-free."""
    check_student(cfg.student)
    check_batch_split(cfg.batch_size, torchrun_env()[1], cfg.workers, cfg.accum_steps)
    if cfg.unlabeled is not None and cfg.unlabeled_cache is None:
        raise ConfigError("--unlabeled needs --unlabeled-cache (made by `dho precompute-teacher` on that dataset)")
    labeled = data.Dataset.open(cfg.labeled)
    l_attrs = check_cache_belongs(cfg.labeled_cache, labeled)
    if cfg.unlabeled is not None:
        unlabeled = data.Dataset.open(cfg.unlabeled)
        if unlabeled.classnames != labeled.classnames:
            raise ConfigError(f"{cfg.unlabeled} and {cfg.labeled} have different class lists; both must come from one source dataset")
        u_attrs = check_cache_belongs(cfg.unlabeled_cache, unlabeled)
        for name in ("eta", "zeta"):
            if l_attrs is not None and u_attrs is not None and u_attrs.get(name) != l_attrs.get(name):
                raise CacheError(f"the labeled and unlabeled caches were made with different {name} "
                                 f"({l_attrs.get(name)} vs {u_attrs.get(name)})")
    if cfg.val is not None:
        data.Dataset.open(cfg.val)
