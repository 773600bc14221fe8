"""The training data of a run: each dataset and cache opened and checked ONCE, the streams built from them,
and the batches as the loop wants them (on the device, normalised, dense).

    streams = open_streams(cfg, objective)       # the labeled part, the unlabeled stream's parts, sizes, views
    loader = make_loader(streams, ...)            # dho.stream.PairedStream in a DataLoader (workers inherit the parts)
    batches = DeviceBatches(loader, ...)          # next(batches) -> dho.stream.Batch on the device

The unlabeled stream (`--unlabeled-pool`) is labeled ∪ unlabeled (`union`, Alg. 1 line 7: when the
pool does not already hold every labeled key, the labeled part joins it) or the pool without the labeled
samples (`exclude-labeled`, what the reference code's loaders do). A sample whose cache marks it
unreadable is never drawn.

Out of scope: mixed teacher caches within one stream (all caches must share class list and teacher
temperature), the order itself (dho/stream.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dho import data
from dho.cache import TeacherCache
from dho.distill.objective import Objective
from dho.errors import CacheError, ConfigError
from dho.data.gpu_views import decode_views
from dho.interrupt import ignore_interrupt
from dho.stream import Batch, Half, PairedStream, Part, PartData


@dataclass
class Streams:
    """The opened training data: the labeled part, the parts of the unlabeled stream, their sizes and views."""

    classnames: list[str]
    labeled: PartData
    unlabeled: list[PartData]  # [] without --unlabeled
    templates: Optional[list[str]]  # the labeled cache's prompt templates (the VLM student's text init)
    embed_dim: int  # the teacher's image-embedding width (the feature-KD projection)
    size_l: int  # valid labeled samples
    size_u: int  # usable samples of the unlabeled stream (0 without one)
    views_u: int  # the fewest training views among the unlabeled stream's caches
    teacher_logit_weight: Optional[np.ndarray] = None  # (C, D) the teacher's text classifier / zeta (--method dhkd)

    def reuse(self, objective: Objective) -> list[tuple[str, int, int]]:
        """(stream, samples, cached views) of each stream the method reads."""
        return ([("labeled", self.size_l, self.labeled.train_views)] if objective.reads_labeled else []) + \
               ([("unlabeled", self.size_u, self.views_u)] if objective.reads_unlabeled else [])


def _open_part(dataset: str, cache: str, role: str, teacher: str = "mean") -> tuple[data.Dataset, TeacherCache]:
    """Open a dataset and its cache and check they belong together (keys, classes, completeness) and that the
    cache's arrays that are not per view read back intact (checksums, every chunk file present); of an ensemble
    cache, `teacher` (mean, a member's index or name) is what the run reads."""
    ds = data.Dataset.open(dataset)
    tc = TeacherCache.open(cache, dataset=ds)
    tc.select(teacher)
    if not tc.is_complete():
        raise CacheError(
            f"{cache}: the teacher cache for the {role} set is incomplete (see `dho cache-info {cache}`); "
            "re-run the same `dho precompute-teacher` command to finish it"
        )
    tc.check_arrays()  # keys, labels, valid, done, text_classifier read once (O(N) bytes): damage stops here, not mid-run
    return ds, tc


def open_streams(cfg, objective: Objective) -> Streams:
    """Open the labeled set and the unlabeled pool with their caches, once, and check them against each other."""
    l_ds, l_cache = _open_part(cfg.labeled, cfg.labeled_cache, "labeled", cfg.teacher)
    if (l_ds.labels < 0).any():
        bad = l_ds.key(int(np.flatnonzero(l_ds.labels < 0)[0]))
        raise ConfigError(f"{cfg.labeled}: the labeled set has unlabeled samples (e.g. key {bad!r}); make it with `dho split`")
    labeled = PartData.of(Part(Path(cfg.labeled), Path(cfg.labeled_cache)), l_ds, l_cache)
    caches, parts_u = [], []
    if cfg.unlabeled is not None:
        if cfg.unlabeled_cache is None:
            raise ConfigError("--unlabeled needs --unlabeled-cache (made by `dho precompute-teacher` on that dataset)")
        u_ds, u_cache = _open_part(cfg.unlabeled, cfg.unlabeled_cache, "unlabeled", cfg.teacher)
        _check_same_ensemble(cfg, l_cache, u_cache)
        if u_ds.classnames != l_ds.classnames:
            raise ConfigError(f"{cfg.unlabeled} and {cfg.labeled} have different class lists; both must come from one source dataset")
        for name in ("eta", "zeta"):
            if u_cache.attrs[name] != l_cache.attrs[name]:
                raise CacheError(f"the labeled and unlabeled caches were made with different {name} ({l_cache.attrs[name]} vs {u_cache.attrs[name]})")
        if u_cache.prompt_names != l_cache.prompt_names:
            old = cfg.labeled_cache if l_cache.prompt_names == "as-given" else cfg.unlabeled_cache
            raise CacheError(f"{old} was made by an older dho that put the class names with '_' into the prompts as given, "
                             "the other cache with '_' read as spaces: rebuild it with `dho precompute-teacher`")
        # the reference code's unlabeled loader: the pool without the labeled samples
        exclude = l_ds.key_bytes if cfg.unlabeled_pool == "exclude-labeled" else ()
        parts_u.append(PartData.of(Part(Path(cfg.unlabeled), Path(cfg.unlabeled_cache), exclude=exclude), u_ds, u_cache))
        caches.append(u_cache)
        # Alg. 1 line 7: unlabeled batches come from labeled ∪ unlabeled. If the unlabeled pool
        # already holds every labeled key (e.g. the full train set), it *is* that union.
        # (an exact hash set of the labeled keys: O(N) and small, where np.isin sorted both key columns)
        if cfg.unlabeled_pool == "union" and not data.KeySet(l_ds.key_bytes).within(u_ds.key_bytes):
            parts_u.append(labeled)
            caches.append(l_cache)
    elif objective.reads_unlabeled:
        raise ConfigError(f"--method {cfg.method} needs --unlabeled DATASET --unlabeled-cache CACHE")
    if cfg.decode == "gpu":
        for path, cache in [(cfg.labeled_cache, l_cache)] + [(p.cache_path, c) for p, c in zip(parts_u, caches)]:
            if cache.augment is not None:
                raise ConfigError(f"{path} was made with --augment / --erase, which dho replays on the CPU only: "
                                  "use --decode cpu (the default) with this cache")
    all_caches = [(cfg.labeled_cache, l_cache)] + [(p.cache_path, c) for p, c in zip(parts_u, caches)]
    if l_cache.is_ensemble and l_cache.member is None and (objective.reads_embeddings or objective.teacher_logits):
        raise ConfigError(f"--method {cfg.method} reads one teacher's image embeddings, which the mean of the ensemble "
                          f"{', '.join(l_cache.teacher_names)} has not: choose one with --teacher NAME")
    if objective.reads_embeddings:
        for path, cache in all_caches:
            if not cache.has_embeddings:
                why = " (to rebuild the teacher's logits)" if objective.teacher_logits else ""
                raise CacheError(f"{path}: --method {cfg.method} needs teacher image embeddings in the caches{why}; "
                                 "re-run `dho precompute-teacher ... --store-embeddings` (a Tip-Adapter-F cache has none)")
    teacher_logit_weight = _teacher_logit_weight(cfg.method, all_caches) if objective.teacher_logits else None
    classnames = list(l_ds.classnames)
    if l_cache.num_classes != len(classnames):
        raise CacheError(f"{cfg.labeled_cache} has {l_cache.num_classes} classes but {cfg.labeled} has {len(classnames)}")
    size_u = sum(int(p.usable.sum()) for p in parts_u)
    if cfg.unlabeled is not None and size_u == 0:
        raise ConfigError(f"the unlabeled stream is empty: every sample of {cfg.unlabeled} is labeled or invalid; "
                          "use --unlabeled-pool union or a larger pool")
    return Streams(classnames, labeled, parts_u, l_cache.attrs.get("templates"), int(l_cache.attrs["embed_dim"]),
                   int(np.asarray(l_cache.valid).sum()), size_u, min((p.train_views for p in parts_u), default=0),
                   teacher_logit_weight)


def _check_same_ensemble(cfg, l_cache: TeacherCache, u_cache: TeacherCache) -> None:
    """The labeled and unlabeled caches hold the same teachers, by name and identity, in the same order (or are both
    single-teacher caches): --teacher then means one thing for both."""
    def members(cache: TeacherCache) -> list:
        return [(m["name"], m["teacher"]["weights_sha256"], m["teacher"]["model_config_sha256"]) for m in cache.members]

    if members(l_cache) != members(u_cache):
        describe = lambda c: f"an ensemble of {', '.join(c.teacher_names)}" if c.is_ensemble else "a single-teacher cache"  # noqa: E731
        raise CacheError(f"--labeled-cache is {describe(l_cache)} but --unlabeled-cache is {describe(u_cache)} (or other "
                         "teachers under these names); merge both with the same caches in the same order (`dho merge-caches`)")


def _teacher_logit_weight(method: str, caches: list) -> np.ndarray:
    """(C, D) float32 text classifier / zeta of the teacher that made every cache: its logits are emb . W^T / zeta
    (Eq. 1, dho.teacher.Teacher.logits). The caches must share one teacher, else its logits are not defined."""
    (path0, first), rest = caches[0], caches[1:]
    weight = first.text_classifier  # (C, D)
    for path, cache in rest:
        if cache.attrs["teacher"] != first.attrs["teacher"] or not np.array_equal(cache.text_classifier, weight):
            raise CacheError(f"{path} and {path0} were made by different teachers (or text classifiers); --method {method} "
                             "distills one teacher's logits: make both caches with the same `dho precompute-teacher` options")
    return weight / float(first.attrs["zeta"])


def make_loader(streams: Streams, objective: Objective, cfg, *, rank: int, world_size: int, micro: int, start_step: int,
                image_size: int, interpolation: str, pin_memory: bool) -> torch.utils.data.DataLoader:
    """The DataLoader over this rank's consumers (`cfg.workers` worker processes, or the main process with 0),
    starting at `start_step` (resume: records already consumed are skipped, no image decoded)."""
    paired = PairedStream(
        [streams.labeled] if objective.reads_labeled else [], streams.unlabeled if objective.reads_unlabeled else [],
        micro_l=micro, micro_u=micro, seed=cfg.seed, rank=rank, world_size=world_size, num_workers=max(cfg.workers, 1),
        start_item=start_step * cfg.accum_steps, view_sampling=cfg.view_sampling, image_size=image_size,
        interpolation=interpolation, eta=cfg.eta, need_embeddings=objective.reads_embeddings, window=cfg.window,
        raw=cfg.decode == "gpu",
    )
    return torch.utils.data.DataLoader(
        paired, batch_size=None, num_workers=cfg.workers, pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=4 if cfg.workers > 0 else None, worker_init_fn=ignore_interrupt if cfg.workers > 0 else None,
    )


class DeviceBatches:
    """The loop's batches: `next()` concatenates one micro-batch of each of this rank's W consumers (the
    DataLoader returns them round-robin) into one `Batch` on the device: each pinned tensor copied
    asynchronously, then concatenated there; top-k rows densified; --decode gpu JPEGs decoded in one batch;
    uint8 images normalised with the student's mean/std (NHWC for convolutional students on CUDA)."""

    def __init__(self, loader: torch.utils.data.DataLoader, num_workers: int, device: torch.device, num_classes: int,
                 preprocess: data.Preprocessing, memory_format: Optional[torch.memory_format]):
        self.batches = iter(loader)
        self.stream: PairedStream = loader.dataset
        self.num_workers, self.device, self.num_classes = num_workers, device, num_classes
        self.preprocess, self.memory_format = preprocess, memory_format
        self.wait_s = 0.0  # seconds spent waiting for the DataLoader since the last `take_wait_s`

    def __next__(self) -> Batch:
        start = time.perf_counter()
        items = [next(self.batches) for _ in range(self.num_workers)]
        self.wait_s += time.perf_counter() - start
        return Batch(*(self._half(name, [getattr(it, name) for it in items]) for name in ("l", "u")))

    def take_wait_s(self) -> float:
        """Seconds `next()` waited for the DataLoader's micro-batches since the previous call (the data wait of one
        log interval; the copies to the device and the GPU decode are not counted)."""
        wait, self.wait_s = self.wait_s, 0.0
        return wait

    def _half(self, name: str, halves: list[Optional[Half]]) -> Optional[Half]:
        if halves[0] is None:
            return None
        pp = self.preprocess

        def cat(field: str) -> Optional[torch.Tensor]:  # copy each pinned micro-batch (asynchronous), concatenate on the device
            if getattr(halves[0], field) is None:
                return None
            return torch.cat([getattr(h, field).to(self.device, non_blocking=True) for h in halves])

        half = Half(label=cat("label"), index=cat("index"), image=cat("image"), probs=cat("probs"),
                    topk_idx=cat("topk_idx"), topk_val=cat("topk_val"), emb=cat("emb"))
        half = self.stream.densify(name, half, self.num_classes)  # top-k caches: (b, K) rows -> (b, C) targets
        image = half.image
        if halves[0].data is not None:  # --decode gpu: the W micro-batches' JPEGs decoded in one batch on the device
            image = decode_views([b for h in halves for b in h.data], [e for h in halves for e in h.ext],
                                 torch.cat([h.params for h in halves]),  # (b, 5) on the host
                                 pp.image_size, pp.interpolation, self.device)  # (b, 3, S, S) uint8
        image = data.normalize(image, pp.mean, pp.std)  # uint8 from the workers -> the student's normalisation
        if self.memory_format is not None:
            image = image.contiguous(memory_format=self.memory_format)
        return half._replace(image=image)
