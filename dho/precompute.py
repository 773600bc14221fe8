"""Stage 1: run the teacher once over V augmented views of every sample into a teacher cache.

`precompute(dataset, out, ...)` reads top to bottom (after the option checks, `_check_options`):
  1. ranks (`dho.devices.setup_ranks`): torchrun (RANK / WORLD_SIZE / LOCAL_RANK env; gloo on CPU, nccl on CUDA) or explicit
     `rank` / `world_size` (job arrays, no process group); a single process otherwise;
  2. the dataset and the teacher (`dho.teacher.load_teacher`) with its zero-shot text classifier;
  3. the store (`dho.cache.TeacherCache`, `_open_store`): created with every attribute, keys, labels and the text
     classifier before any unit is written (torchrun: rank 0 creates, barrier, others open; job
     arrays: every rank tries an atomic create and the losers open the winner's store). An existing
     store built with other parameters is an error, never a mix;
  4. work: units are (view, dataset shard); ranks own whole groups of `shard_group` shards (the
     shards of one Zarr shard, cache schema v4; groups round-robin, `TeacherCache.shard_owner`) and skip
     shards whose units are all done. DataLoader workers decode each image once and replay all its
     views (`data.view_params` boxes replayed with `data.replay_view`, then `--augment` / `--erase` programs
     of (seed, key, view), `data.augment`; the optional last center view
     is open_clip's eval transform, `data.eval_view_uint8`, its region stored as a box) at the
     teacher's size / interpolation / mean / std. Batches never
     cross shards and are formed the same way on every run (shard, batch size, views), so a resumed
     or multi-rank run computes bit-identical numbers on the same hardware (a partly done shard is
     recomputed whole). Each worker takes whole shards: more workers than this rank's shards idle;
  5. the teacher runs batched under torch.inference_mode and autocast (`precision`); per sample and
     view p = softmax(cos(f_X(x), w_c) / (zeta * eta)) (Eq. 1 with the KD temperature). One batch
     is in flight: while the device runs batch k, the host scatters batch k-1 and writes shards
     (`_run_batches`);
  6. when a shard's rows are all in (`_ShardRows`), each of its pending units is written as whole
     chunks, fsynced, then marked done; whichever process finds every unit done sets `complete=True`.

Precision: `auto` = fp16 autocast on CUDA (the reference code's choice; bf16 moves a probability
by up to ~2e-2 and the cache keeps it for every student), fp32 on CPU. Unreadable images raise DatasetError naming shard and key; with
`skip_bad` they are recorded as invalid (see dho/cache.py for how readers see them).

Test-only hook: env DHO_TEST_SLOW_UNITS=SECONDS sleeps after every written unit, so tests can
SIGKILL a run between units. Never set it otherwise.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from dho import data
from dho.data.augment import augment_view, parse_augment
from dho.cache import TeacherCache
from dho.cache_layout import chunk_length, row_bytes, shard_group as auto_shard_group, store_files
from dho.devices import Ranks, cpu_threads_beside_workers, default_workers, resolve_device, setup_ranks
from dho.errors import ConfigError, DatasetError, Interrupted
from dho.interrupt import StopSignal, ignore_interrupt, workers_gone
from dho.losses import ETA, ZETA
from dho.precompute_options import DEFAULT_BATCH_SIZE, DEFAULT_VIEWS, check_options
from dho.progress import Progress
from dho.teacher import DEFAULT_MODEL, DEFAULT_PRETRAINED, load_teacher
from dho.templates import TEACHER_TEMPLATES



def precompute(
    dataset,
    out,
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    templates: str | list[str] = TEACHER_TEMPLATES,
    text_classifier_norm: str = "renormalize",
    views: int = DEFAULT_VIEWS,
    center_view: bool = False,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    precision: str = "auto",
    device: str = "auto",
    workers: int | None = None,
    store_embeddings: bool = False,
    topk: int | None = None,
    eta: float = ETA,
    zeta: float = ZETA,
    rank: int | None = None,
    world_size: int | None = None,
    shard_group: int | None = None,
    skip_bad: bool = False,
    compile: bool | None = None,
    image_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    interpolation: str | None = None,
    resize_mode: str | None = None,
    augment: str | None = None,
    erase: float | None = None,
    progress_every_s: float = 30.0,
    stats: dict | None = None,
) -> TeacherCache:
    """Fill (or resume) the teacher cache `out` for `dataset`; returns it opened read-only.

    `stats`, if given, is filled with this rank's timing: images (sample-views) computed,
    setup_s (teacher + store), loop_s (decode -> teacher -> writes) and first_batch_s (worker
    start-up until the first batch arrives, part of loop_s), for bench/. `workers` None: what the machine has
    (`dho.devices.default_workers`). `augment` ("randaugment:N,M") and `erase` (P): the strong augmentation of every
    random view (`dho.data.augment`), stored as the cache attribute `augment` and replayed by distill.
    """
    t_start = time.time()
    augment_attr = parse_augment(augment, erase)
    # every option is checked here, where it enters (the CLI passes them through unchanged)
    check_options(out, model=model, pretrained=pretrained, views=views, batch_size=batch_size, workers=workers, seed=seed, eta=eta, zeta=zeta,
                   precision=precision, text_classifier_norm=text_classifier_norm, topk=topk, shard_group=shard_group,
                   image_size=image_size, mean=mean, std=std)
    ranks = setup_ranks(resolve_device(device), rank, world_size)
    rank, world_size, dev = ranks.rank, ranks.world_size, ranks.device
    workers = default_workers(dev.type) if workers is None else workers
    log = (lambda msg: print(f"precompute-teacher [rank {rank}/{world_size}]: {msg}", file=sys.stderr, flush=True))

    # ---- data and teacher
    ds = data.Dataset.open(dataset)
    if topk is not None and not 1 <= topk < ds.num_classes:
        raise ConfigError(f"--topk {topk} must be in [1, {ds.num_classes - 1}] for {ds.num_classes} classes (or leave it out: dense)")
    teacher = load_teacher(
        model, pretrained, dev, precision, classnames=ds.classnames, templates=templates,
        text_classifier_norm=text_classifier_norm, image_size=image_size,
        mean=mean, std=std, interpolation=interpolation, resize_mode=resize_mode, verbose=rank == 0, compile=compile,
    )

    # ---- the store: fully created before any unit is written
    total_views = views + int(center_view)
    attrs = _store_attrs(ds, teacher, num_views=total_views, center_view=center_view, seed=seed, zeta=zeta, eta=eta,
                         topk=topk, store_embeddings=store_embeddings, shard_group=shard_group)
    if augment_attr is not None:
        attrs["augment"] = augment_attr
    cache = _open_store(out, ds, teacher, attrs, ranks)
    if cache.prompt_names != teacher.identity["prompt_names"] and rank == 0:  # complete (check_params refuses otherwise)
        log(f"note: {out} was made by an older dho that put the class names with '_' into the prompts as given; it is "
            "complete and stays so: write a new --out for the prompts of the reference code (names with spaces)")

    files = store_files(cache.attrs)
    if files > MANY_FILES and rank == 0:
        sparse = {**cache.attrs, "topk": 10, "store_embeddings": False}
        sparse["shard_group"] = auto_shard_group(sparse["shard_counts"], sparse["chunk_len"], row_bytes(sparse))
        log(f"note: {out} will be {files:,} files ({cache.shard_group} dataset shard(s) per Zarr shard: a unit of its widest "
            f"array is already about {cache.chunk_len * row_bytes(cache.attrs) / 2**20:.1f} MiB); a top-10 cache without "
            f"embeddings would be {store_files(sparse):,} (--topk 10): see 'Files' in cache_schemas/README.md")

    # ---- this rank's work: whole shards with any unit not done
    # (schema v4: groups of `shard_group` consecutive shards share Zarr shards, so ranks own whole groups, round-robin)
    mine = [s for s in range(len(ds.shards)) if cache.shard_owner(s) % world_size == rank]
    todo = [s for s in mine if not cache.done[:, s].all()]
    total_images = sum(ds.shards[s].count for s in todo) * total_views
    if not mine:  # a job array or torchrun with more ranks than the store has shard groups
        log(f"note: this rank has no shard to write: the store's {len(ds.shards)} shards form "
            f"{cache.shard_owner(len(ds.shards) - 1) + 1} group(s), one writer each; use at most that many ranks")
    if views > VIEWS_NOTE and rank == 0:
        log(f"note: --views {views}: {ds.num_samples * total_views:,} teacher forwards and "
            f"~{ds.num_samples * total_views * (topk or ds.num_classes) * 2 / 2**30:.1f} GiB of probabilities; "
            "the recipes give each cache the views its schedule draws (`recipe.py labeled-views`)")
    log(
        f"teacher {teacher.identity['model']} / {teacher.identity['pretrained']} on {dev} ({teacher.precision}); "
        f"{total_views} views; {len(todo)} of my {len(mine)} shards to do ({len(ds.shards)} in all); {workers} DataLoader workers"
    )
    cpu_threads_beside_workers(dev, workers, world_size)
    loader = torch.utils.data.DataLoader(
        _ShardBatches(ds, todo, views, center_view, seed, teacher.preprocess, max(1, batch_size // total_views), augment_attr),
        batch_size=None,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        worker_init_fn=ignore_interrupt if workers > 0 else None,
    )
    progress = Progress(f"precompute-teacher [rank {rank}/{world_size}]", total_images, unit="images",
                        every_s=progress_every_s)
    rows = _ShardRows(cache, ds, total_views, teacher.embed_dim, topk, store_embeddings, progress)
    t_loop = time.time()
    t_first = _run_batches(loader, teacher, rows, zeta=zeta, eta=eta, skip_bad=skip_bad, out=out) or t_loop
    if total_images == 0:
        progress.update(0)  # nothing to do: still the one line that says so
    if stats is not None:
        stats.update(images=progress.done, setup_s=t_loop - t_start, loop_s=time.time() - t_loop, first_batch_s=t_first - t_loop)
    rows.check_all_written()
    _finalize(cache, ranks, log, out)
    return TeacherCache.open(out, dataset=ds)


VIEWS_NOTE = 1000  # more views than this: a line with the cost (no hard bound: 1-shot ImageNet labeled caches want ~2,600)
MANY_FILES = 50_000  # a store of more files gets a note: what a file-system quota may refuse (README, "How far it scales")


def _store_attrs(ds, teacher, *, num_views: int, center_view: bool, seed: int, zeta: float, eta: float,
                 topk: int | None, store_embeddings: bool, shard_group: int | None) -> dict:
    """The cache's parameters (`cache.PARAM_KEYS`): a rerun with other values is refused, never mixed in."""
    attrs = {
        "dataset_fingerprint": ds.fingerprint,
        "num_samples": ds.num_samples,
        "classnames": list(ds.classnames),
        "num_views": num_views,
        "center_view": bool(center_view),
        "seed": int(seed),
        "zeta": float(zeta),
        "eta": float(eta),
        "teacher": dict(teacher.identity),
        "templates": list(teacher.templates),
        "text_classifier_norm": teacher.text_classifier_norm,
        "preprocess": teacher.preprocess.to_dict(),
        "precision": teacher.precision,
        "topk": topk,
        "store_embeddings": bool(store_embeddings),
        "embed_dim": teacher.embed_dim,
        "shard_counts": [s.count for s in ds.shards],
        "chunk_len": chunk_length([s.count for s in ds.shards]),
    }
    if shard_group is not None:  # else chosen at creation (`cache.shard_group`); not a parameter of the numbers
        attrs["shard_group"] = shard_group
    return attrs


def _open_store(out, ds, teacher, attrs: dict, ranks: Ranks) -> TeacherCache:
    """Create the store with every attribute, keys, labels and the text classifier, or open the one there with
    the same parameters (torchrun: rank 0 creates, barrier, the others open; job arrays: every rank tries an
    atomic create and the losers open the winner's store)."""
    create = dict(attrs=attrs, keys=ds.keys, labels=ds.labels, text_classifier=teacher.text_classifier.cpu().numpy(), dataset=ds)
    if not ranks.group:
        return TeacherCache.create_or_open(out, **create)
    if ranks.rank == 0:
        cache = TeacherCache.create_or_open(out, **create)
    torch.distributed.barrier()
    if ranks.rank != 0:
        cache = TeacherCache.open(out, dataset=ds, mode="r+")
        cache.check_params(attrs)
    return cache


class _ShardBatches(torch.utils.data.IterableDataset):
    """Teacher input batches: `samples_per_batch` consecutive samples of one shard, all views each.

    Runs in DataLoader workers (each takes whole shards through data.OrderedReader). Every image
    is decoded once; an unreadable one yields zero images, -1 params, valid=False and its error.
    """

    def __init__(self, ds, shards: list[int], num_views: int, center_view: bool, seed: int, preprocess: data.Preprocessing,
                 samples_per_batch: int, augment: dict | None = None):
        super().__init__()
        self.augment = augment
        self.ds, self.shards = ds, shards
        self.num_views, self.center_view, self.seed = num_views, center_view, seed
        self.pp = preprocess
        self.samples_per_batch = samples_per_batch

    def __iter__(self):
        reader = data.OrderedReader(self.ds, rank=0, world_size=1, shards=self.shards, decode=False)
        buf = []
        for sample in reader:
            if buf and (sample.shard != buf[0].shard or len(buf) == self.samples_per_batch):
                yield self._batch(buf)
                buf = []
            buf.append(sample)
        if buf:
            yield self._batch(buf)

    def _batch(self, samples: list) -> dict:
        pp, n = self.pp, len(samples)
        total = self.num_views + int(self.center_view)
        size = pp.image_size
        images = torch.zeros(n, total, 3, size, size)  # (b, V', 3, S, S)
        params = torch.full((n, total, 5), -1, dtype=torch.int32)  # (b, V', 5)
        valid = torch.ones(n, dtype=torch.bool)
        errors = []
        for i, s in enumerate(samples):
            where = f"shard {s.shard} ({self.ds.shards[s.shard].name}) key {s.key!r}"
            try:
                image = data.decode_image(s.data, s.ext, where)
            except DatasetError as e:
                valid[i] = False
                errors.append(str(e))
                continue
            w, h = image.size
            for v in range(total):
                if v == self.num_views:  # the evaluation view, last: open_clip's eval transform, pixel for pixel
                    box = data.center_view_params(w, h, pp.resize_mode)  # the region it shows, for the record
                    images[i, v] = pp.eval_view(image)
                else:
                    box = data.view_params(s.key, v, self.seed, w, h)
                    view = data.replay_view_uint8(image, box, size, pp.interpolation)  # (3, S, S) uint8
                    view = augment_view(view, self.augment, self.seed, s.key, v)  # strong augmentation (or as is)
                    images[i, v] = data.normalize(view, pp.mean, pp.std)
                params[i, v] = torch.tensor([int(b) for b in box], dtype=torch.int32)
        return {
            "images": images.view(n * total, 3, size, size),  # (b * V', 3, S, S), sample-major
            "shard": samples[0].shard,
            "rows": torch.tensor([s.index for s in samples], dtype=torch.int64),  # (b,) global rows
            "params": params,
            "valid": valid,
            "errors": errors,
        }

def _run_batches(loader, teacher, rows: "_ShardRows", *, zeta: float, eta: float, skip_bad: bool, out) -> float | None:
    """Run the teacher over every batch, one batch in flight: while the device runs batch k, the host
    collects batch k-1 into `rows` (and writes the shards it completes). Stops between batches on
    SIGTERM / SIGINT / SIGUSR1 (Interrupted) and at the first unreadable image unless `skip_bad` (DatasetError),
    after collecting the batch in flight. -> the time the first batch arrived (None: no batch)."""
    in_flight, t_first = None, None

    def interrupted(name: str) -> Interrupted:
        done = int(rows.cache.done.sum())
        return Interrupted(f"stopped by {name} with {done}/{rows.cache.done.size} units of {out} done; rerun the same "
                           "command to compute the rest")

    with torch.inference_mode(), StopSignal() as stop:
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except RuntimeError as e:  # SIGTERM took the DataLoader workers too
                if not workers_gone(e, stop):
                    raise
                batch = None
            if stop.signum is not None:  # stop between batches: the batch in flight may finish a shard's units,
                if in_flight is not None:  # the rows of shards not yet complete are dropped (recomputed on rerun)
                    rows.add(*in_flight)
                raise interrupted(stop.name)
            if rows.progress.done == 0 and in_flight is None:
                t_first = time.time()
            if batch["errors"] and not skip_bad:
                if in_flight is not None:
                    rows.add(*in_flight)
                raise DatasetError(
                    f"{batch['errors'][0]}; or pass --skip-bad to `dho precompute-teacher` to record it as invalid"
                )
            launched = (batch, *_run_teacher(teacher, batch["images"], zeta, eta, rows.topk, rows.store_embeddings))
            if in_flight is not None:
                rows.add(*in_flight)
            in_flight = launched
        if in_flight is not None:
            rows.add(*in_flight)
    return t_first


def _run_teacher(teacher, images: torch.Tensor, zeta: float, eta: float, topk: int | None,
                 store_embeddings: bool) -> tuple[dict, object]:
    """Enqueue the teacher on one batch (B = b * V' images) and start copying its results to the host.

    Returns ({name: (B, X) host tensor}, a CUDA event to wait on, or None on CPU). Per image:
    p = softmax(cos(f_X(x), w_c) / (zeta * eta)) (Eq. 1 at the KD temperature), float16.
    """
    emb = teacher.encode_images(images)  # (B, D) float32, unit norm
    p = torch.softmax(teacher.logits(emb, zeta) / eta, dim=-1)  # (B, C)
    out = {}
    if topk is None:
        out["probs"] = p.to(torch.float16)
    else:
        values, indices = torch.topk(p, topk, dim=-1)  # (B, K) each, largest first
        out["probs"], out["topk_indices"] = values.to(torch.float16), indices.to(torch.int32)
    if store_embeddings:
        out["embeddings"] = emb.to(torch.float16)  # (B, D)
    if teacher.device.type != "cuda":
        return out, None
    out = {k: v.to("cpu", non_blocking=True) for k, v in out.items()}
    ready = torch.cuda.Event()
    ready.record()
    return out, ready


class _ShardRows:
    """The teacher rows of the shards in progress, for every view; a shard's units are written once all its rows are in.

    Batches never cross shards, so a shard's buffer fills from its own batches; NaN / -1 rows stay for
    invalid samples. Writing a shard: `valid`, then each pending unit as whole chunks, fsynced, marked done.
    """

    def __init__(self, cache: TeacherCache, ds, num_views: int, embed_dim: int, topk: int | None, store_embeddings: bool,
                 progress: Progress):
        self.cache, self.ds, self.num_views, self.embed_dim = cache, ds, num_views, embed_dim
        self.topk, self.store_embeddings, self.progress = topk, store_embeddings, progress
        self.buffers: dict[int, dict] = {}
        self.slow_units = float(os.environ.get("DHO_TEST_SLOW_UNITS", "0"))  # test-only hook, see module docstring

    def _buffer(self, n: int) -> dict:
        """Empty rows of one shard of n samples, every view: (V', n, X)."""
        V, topk = self.num_views, self.topk
        return {
            "probs": np.full((V, n, topk or self.ds.num_classes), np.nan, dtype=np.float16),
            "topk_indices": np.full((V, n, topk), -1, dtype=np.int32) if topk else None,
            "embeddings": np.full((V, n, self.embed_dim), np.nan, dtype=np.float16) if self.store_embeddings else None,
            "params": np.full((V, n, 5), -1, dtype=np.int32),
            "valid": np.zeros(n, dtype=bool),
            "filled": 0,
        }

    def add(self, batch: dict, results: dict, ready) -> None:
        """Scatter one batch's teacher results into its shard's buffer; write the shard's units once it is full."""
        if ready is not None:
            ready.synchronize()  # the non-blocking copies to the host have landed
        s = int(batch["shard"])
        n, start = self.ds.shards[s].count, self.ds.shards[s].offset
        if s not in self.buffers:
            self.buffers[s] = self._buffer(n)
        buf = self.buffers[s]
        b = len(batch["rows"])
        pos = (batch["rows"] - start).numpy()  # (b,) rows inside the shard
        ok = batch["valid"].numpy()  # (b,)
        for name, values in results.items():  # (b * V', X) sample-major -> (V', b, X)
            values = values.view(b, self.num_views, -1).transpose(0, 1).numpy()
            buf[name][:, pos[ok]] = values[:, ok]
        buf["params"][:, pos] = batch["params"].numpy().transpose(1, 0, 2)  # (V', b, 5)
        buf["valid"][pos] = ok
        buf["filled"] += b
        self.progress.update(b * self.num_views)
        if buf["filled"] >= n:
            self._write(s, buf)
            del self.buffers[s]

    def _write(self, s: int, buf: dict) -> None:
        """Every row of shard s is in: write its pending units (whole chunks, fsynced, then done)."""
        cache, topk = self.cache, self.topk
        cache.write_valid(s, buf["valid"])
        for v in range(self.num_views):
            if cache.done[v, s]:
                continue
            cache.write_unit(
                v, s,
                view_params=buf["params"][v],
                probs=buf["probs"][v] if topk is None else None,
                topk_indices=buf["topk_indices"][v] if topk is not None else None,
                topk_probs=buf["probs"][v] if topk is not None else None,
                embeddings=buf["embeddings"][v] if self.store_embeddings else None,
            )
            if self.slow_units:
                time.sleep(self.slow_units)

    def check_all_written(self) -> None:
        """A shard still buffered yielded fewer rows than its manifest count (iter_shard checks this too)."""
        if self.buffers:
            s = next(iter(self.buffers))
            raise DatasetError(f"shard {s} ({self.ds.shards[s].path}) ended after {self.buffers[s]['filled']} of "
                               f"{self.ds.shards[s].count} samples")


def _finalize(cache: TeacherCache, ranks: Ranks, log, out) -> None:
    """Rank 0 after a barrier (torchrun), else whichever process sees every unit done, marks the cache complete."""
    if ranks.group:
        torch.distributed.barrier()
    if not ranks.group or ranks.rank == 0:
        if cache.finalize():
            log(f"complete: {int(cache.done.sum())}/{cache.done.size} units -> {out}")
        else:
            log(
                f"my units are done; {int(cache.done.sum())}/{cache.done.size} units overall. The last process to "
                "finish (or a rerun of the same command) marks the cache complete"
            )
    if ranks.group:
        torch.distributed.barrier()  # nobody returns before rank 0 has finalised
    if ranks.group == "own":
        torch.distributed.destroy_process_group()
