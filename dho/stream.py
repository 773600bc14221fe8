"""Training streams for `dho distill`: labeled + unlabeled micro-batches replayed from the cache.

The stream is the only place where the order of training samples is decided. It is a pure
function of (seed, pass number, consumer), so a run can resume at any step by skipping
records without decoding a single image, and the global batch of a step does not depend on
how consumers are spread over ranks and DataLoader workers.

Consumers. There are C = world_size x max(workers, 1) consumers; consumer c = rank * W + worker.
Every step, each consumer yields one micro-batch (b_l labeled + b_u unlabeled samples); a rank
concatenates the W micro-batches of its workers (the DataLoader returns them round-robin), and
DDP averages over ranks. So one process with 2 workers and `torchrun` with 2 ranks x 1 worker
train on exactly the same global batches.

Order. Pass p of a stream (one sweep over its shards) permutes all shards with a generator
seeded by (seed, stream, p), lines up their valid samples in that order, and cuts the line into
C contiguous chunks whose sizes differ by at most one: consumer c takes chunk c and shuffles its
samples inside windows of `window` consecutive shards. So every consumer yields the same number
of samples per pass (the passes of all consumers stay in step, and no sample is seen more often
than another), reads only the few shards its chunk touches (each shard is read by at most a
couple of consumers, sequentially, once per pass), and keeps at most `window` + 1 shards in memory.
Passes repeat forever; the loop decides how many steps an epoch has.

Views. Each sample's view comes from its own cache: `cycle` uses view (pass mod V), so a
sample is seen under all V teacher views in turn; `random` draws a view per (seed, key, pass).
The student's crop is replayed from the cached `view_params` at the student's resolution
(`data.decode_view` + `data.replay_view_uint8`), i.e. the student sees the view the teacher saw; a cache made
with `--augment` / `--erase` (schema v7 attribute `augment`) has each view's RandAugment / erasing program
replayed on it (`data.augment.augment_view`, a function of the cache's seed, the key and the view).
Workers yield uint8 images (a quarter of the bytes through shared and pinned memory); the loop
normalises them on the device with the student's mean/std (`data.normalize`). With `raw=True`
(`dho distill --decode gpu`) workers decode nothing: they yield each sample's encoded bytes, its
extension and the cached view params, and the loop decodes the batch on the device
(`data.gpu_views.decode_views`).

Batches. A consumer yields one `Batch` per step: a `Half` record for the labeled and one for the
unlabeled micro-batch (None for a half the method does not read), tensors named as the paper names
them (image, label, probs, emb) with their shapes in the class docstring.

Memory. Each dataset and cache is opened once, by whoever builds the stream (`PartData.open`, or
`PartData.of` for a dataset and cache already opened and checked, as `dho distill` does); workers
inherit numpy arrays (shard counts, labels, the usable-sample bitmap, the cache's done/valid) and read
only shards and cache chunks, so a worker's own memory does not grow with the number of samples.
Top-k caches stay sparse (b, K) up to the loop, which densifies them on the device (`densify`, with
`cache.densify_topk` + `cache.retemper`).

Out of scope: images are read per shard into memory (a window of `window` shards per consumer);
very large shards need a smaller window.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dho import data
from dho.data.augment import augment_view
from dho.cache import TeacherCache, densify_topk, retemper
from dho.errors import ConfigError


@dataclass(frozen=True)
class Part:
    """One dataset with its teacher cache, as a member of a stream; `exclude` keys are never drawn
    (strings, or a numpy bytes array such as another dataset's `key_bytes`)."""

    dataset_path: Path
    cache_path: Path
    exclude: tuple | np.ndarray = field(default=(), compare=False)

    def usable(self, key_bytes: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(N,) bool: valid in the cache and not excluded (`key_bytes`: the dataset's (N,) keys as bytes)."""
        valid = np.asarray(valid, dtype=bool)
        if len(self.exclude) == 0:
            return valid
        exclude = self.exclude if isinstance(self.exclude, np.ndarray) else data.encode_strings(self.exclude)
        return valid & ~data.KeySet(exclude).contains(key_bytes)  # np.isin's answer in O(N), no sort of the keys


@dataclass
class PartData:
    """What a consumer needs of one part, opened and checked once in the main process and inherited by
    the DataLoader workers: the dataset (shards + columns as numpy arrays, memory-mapped for columnar
    manifests), the cache's (V, S) done / (N,) valid arrays, the usable rows and their count per shard.
    No per-sample Python object: forked workers share these pages instead of re-reading the manifest."""

    dataset: "data.Dataset"
    cache_path: Path
    done: np.ndarray  # (V, S) bool
    valid: np.ndarray  # (N,) bool
    usable: np.ndarray  # (N,) bool
    usable_per_shard: np.ndarray  # (S,) int64: usable samples of each shard
    train_views: int
    topk: int | None
    cache_eta: float
    teacher: int | None = None  # the selected member of an ensemble cache (`TeacherCache.select`), None = the mean
    augment: dict | None = None  # the cache's strong augmentation (schema v7, `dho.data.augment`), replayed on each view
    view_seed: int = 0  # the cache's `seed`: of its view boxes and augmentation programs

    @classmethod
    def open(cls, part: Part) -> "PartData":
        """Open the part's dataset and cache (checked against each other)."""
        ds = data.Dataset.open(part.dataset_path)
        return cls.of(part, ds, TeacherCache.open(part.cache_path, dataset=ds))

    @classmethod
    def of(cls, part: Part, ds: "data.Dataset", cache) -> "PartData":
        """The part from its dataset and its cache (a `TeacherCache` checked against `ds`), opened by the caller."""
        usable = part.usable(ds.key_bytes, cache.valid)
        return cls(ds, part.cache_path, cache.done, cache.valid, usable, count_per_shard(usable, [s.count for s in ds.shards]),
                   cache.train_views, cache.topk, cache.eta, cache.member, cache.augment, int(cache.attrs["seed"]))


@dataclass(frozen=True)
class Record:
    """One sample of a consumer's order: which part, shard and position, in which pass."""

    part: int
    shard: int
    pos: int
    pass_: int


def _seed_of(*items) -> int:
    """The training order's seeds: `data.stable_seed` read little-endian (fixed: resumable runs depend on it)."""
    return data.stable_seed(*items, byteorder="little")


def consumer_records(
    shard_counts: list[list[int]],
    valid: list[np.ndarray],
    *,
    stream: str,
    seed: int,
    consumer: int,
    num_consumers: int,
    window: int,
    valid_per_shard: list[np.ndarray] | None = None,
    start: int = 0,
) -> Iterator[Record]:
    """The infinite, deterministic order of records for one consumer (no I/O).

    shard_counts[part][shard] = samples in that shard; valid[part] = (N_part,) bool, False for
    samples the teacher cache marked unreadable (they are never yielded); `valid_per_shard[part]`
    = (S_part,) their counts per shard when the caller has them (else counted here, O(N) memory).
    Works on arrays: per pass a permutation of the S shards and, per window, the (part, shard,
    position) arrays of its records. `start` records are skipped (resume) without being made: whole passes
    by arithmetic (a consumer yields hi - lo records per pass), whole windows by drawing only their
    permutation (the generator's state must advance as if they were read), so the records that follow
    are those the unskipped order yields after its first `start`.
    """
    shards_part = np.concatenate([np.full(len(c), p, dtype=np.int64) for p, c in enumerate(shard_counts)] or [np.zeros(0, np.int64)])
    shards_index = np.concatenate([np.arange(len(c), dtype=np.int64) for c in shard_counts] or [np.zeros(0, np.int64)])
    offsets = [np.concatenate([[0], np.cumsum(c, dtype=np.int64)[:-1]]) if len(c) else np.zeros(0, np.int64) for c in shard_counts]
    if valid_per_shard is None:
        valid_per_shard = [count_per_shard(v, c) for v, c in zip(valid, shard_counts)]
    valid_per_shard = np.concatenate([np.asarray(v, dtype=np.int64) for v in valid_per_shard] or [np.zeros(0, np.int64)])
    total = int(valid_per_shard.sum())
    if total == 0:
        raise ConfigError(f"the {stream} stream has no usable samples (empty datasets or every sample invalid in the cache)")
    if total < num_consumers:
        raise ConfigError(
            f"the {stream} stream has {total} usable samples for {num_consumers} data consumers (ranks x workers); "
            "use fewer --workers or ranks"
        )
    lo, hi = consumer * total // num_consumers, (consumer + 1) * total // num_consumers  # my chunk of the pass

    def positions(i: int) -> np.ndarray:
        p, s = int(shards_part[i]), int(shards_index[i])
        off, n = int(offsets[p][s]), int(shard_counts[p][s])
        return np.flatnonzero(valid[p][off:off + n])  # valid positions inside the shard

    pass_, skip = divmod(start, hi - lo)
    while True:
        rng = np.random.default_rng(_seed_of(seed, stream, "pass", pass_))
        order = rng.permutation(len(shards_part))
        local = np.random.default_rng(_seed_of(seed, stream, "pass", pass_, "consumer", consumer))
        ends = np.cumsum(valid_per_shard[order])  # line position after each shard, in pass order
        starts = ends - valid_per_shard[order]
        mine = np.flatnonzero((valid_per_shard[order] > 0) & (starts < hi) & (ends > lo))  # my shards, in pass order
        for w in range(0, len(mine), window):
            if skip:  # resume: a window wholly consumed is counted, not built
                take = [(max(lo - int(starts[j]), 0), min(hi - int(starts[j]), int(valid_per_shard[order[j]]))) for j in mine[w:w + window]]
                count = sum(b - a for a, b in take)
                if skip >= count:
                    local.permutation(count)  # (the draws its reading made)
                    skip -= count
                    continue
            parts, shards, pos = [], [], []
            for j in mine[w:w + window]:
                i = order[j]
                at = positions(i)[max(lo - int(starts[j]), 0):min(hi - int(starts[j]), int(valid_per_shard[i]))]
                parts.append(np.full(len(at), shards_part[i]))
                shards.append(np.full(len(at), shards_index[i]))
                pos.append(at)
            parts_a, shards_a, pos_a = np.concatenate(parts), np.concatenate(shards), np.concatenate(pos)
            perm = local.permutation(len(pos_a))
            perm, skip = perm[skip:], 0
            for k in perm.tolist():
                yield Record(int(parts_a[k]), int(shards_a[k]), int(pos_a[k]), pass_)
        pass_ += 1


def count_per_shard(valid: np.ndarray, counts) -> np.ndarray:
    """(S,) number of True entries of `valid` per shard (np.add.reduceat over the shard starts; empty shards 0)."""
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros(len(counts), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    nonempty = counts > 0
    if nonempty.any():
        out[nonempty] = np.add.reduceat(np.asarray(valid, dtype=bool), starts[nonempty], dtype=np.int64)
    return out


class _PartReader:
    """Reads shards and (view, shard) cache blocks of one part in a consumer, keeping a few in memory.

    Built from a `PartData` (nothing is re-opened or re-checked per worker; the cache handle reads
    chunks only). The block cache holds (window + 1) shards' blocks of every view that can be drawn
    (one per pass with `cycle`, all training views with `random`), so a window never re-reads a block.
    Top-k caches stay sparse: a block is the (n, K) indices and probabilities as stored."""

    def __init__(self, part: PartData, window: int, view_sampling: str, eta: float, need_embeddings: bool, sparse: bool):
        self.part = part
        self.ds = part.dataset
        self.cache = TeacherCache.reopen(part.cache_path, done=part.done, valid=part.valid,
                                         teacher="mean" if part.teacher is None else part.teacher)
        self.eta = eta
        self.need_embeddings = need_embeddings
        self.sparse = sparse
        self.keep = window + 1
        self.keep_blocks = self.keep * (part.train_views if view_sampling == "random" else 1)
        self._shards: OrderedDict[int, list] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], dict] = OrderedDict()
        self.train_views = part.train_views

    def sample(self, shard: int, pos: int):
        if shard not in self._shards:
            self._shards[shard] = list(data.iter_shard(self.ds, shard, decode=False))
            while len(self._shards) > self.keep:
                self._shards.popitem(last=False)
        self._shards.move_to_end(shard)
        return self._shards[shard][pos]

    def block(self, view: int, shard: int) -> dict:
        key = (view, shard)
        if key not in self._blocks:
            info = self.ds.shards[shard]
            start, stop = info.offset, info.offset + info.count
            block = {"params": self.cache.view_params(view, start, stop)}  # (n, 5) int32
            if self.sparse:
                block["topk_idx"], block["topk_val"] = self.cache.topk_rows(view, start, stop)  # (n, K) int64, float32 (invalid rows are never drawn)
            else:
                block["probs"] = self.cache.probs(view, start, stop, eta=self.eta)  # (n, C) float32
            if self.need_embeddings:
                block["emb"] = self.cache.embeddings(view, start, stop)  # (n, D)
            self._blocks[key] = block
            while len(self._blocks) > self.keep_blocks:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(key)
        return self._blocks[key]


class Half(NamedTuple):
    """One side (labeled or unlabeled) of a micro-batch of b samples. From the workers: `image` (b, 3, S, S)
    uint8 (None with raw=True), `label` (b,) int64 (-1 = unlabeled), `index` (b,) global rows of their
    datasets (for tests and debugging), the teacher's `probs` (b, C) float32, or for a sparse (top-k) half
    `topk_idx` (b, K) int64 + `topk_val` (b, K) float32 instead, `emb` (b, D) float32 teacher embeddings
    (feature KD only), and with raw=True `data` (b encoded images), `ext` (b extensions), `params` (b, 5)
    int32 cached boxes. The loop turns it into a device half: normalised float `image`, dense `probs`."""

    label: torch.Tensor
    index: torch.Tensor
    image: Optional[torch.Tensor] = None
    probs: Optional[torch.Tensor] = None
    topk_idx: Optional[torch.Tensor] = None
    topk_val: Optional[torch.Tensor] = None
    emb: Optional[torch.Tensor] = None
    data: Optional[list] = None
    ext: Optional[list] = None
    params: Optional[torch.Tensor] = None


class Batch(NamedTuple):
    """A micro-batch: the labeled half `l` and the unlabeled half `u` (None for a half the method does not read)."""

    l: Optional[Half]
    u: Optional[Half]

    def images(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(labeled images, unlabeled images), None for an absent half."""
        return (None if self.l is None else self.l.image), (None if self.u is None else self.u.image)


class PairedStream(IterableDataset):
    """Yields one `Batch` per step for this consumer: its labeled and/or unlabeled halves (`Half`)."""

    def __init__(
        self,
        labeled: list[PartData],
        unlabeled: list[PartData],
        *,
        micro_l: int,
        micro_u: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        start_item: int,
        view_sampling: str,
        image_size: int,
        interpolation: str,
        eta: float,
        need_embeddings: bool = False,
        window: int = 2,
        raw: bool = False,
    ):
        if view_sampling not in ("cycle", "random"):
            raise ConfigError(f"--view-sampling must be 'cycle' or 'random', got {view_sampling!r}")
        # opened and checked by the caller (the main process); workers inherit the arrays
        self.halves = {"l": (list(labeled) if micro_l else [], micro_l), "u": (list(unlabeled) if micro_u else [], micro_u)}
        # a half stays top-k (sparse) up to the loop when all its parts are top-k caches with one K
        self.sparse = {name: bool(parts) and len({p.topk for p in parts}) == 1 and parts[0].topk is not None
                       and len({p.cache_eta for p in parts}) == 1 for name, (parts, _) in self.halves.items()}
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(num_workers, 1)
        self.start_item = start_item
        self.view_sampling = view_sampling
        self.size, self.interpolation = image_size, interpolation
        self.eta = eta
        self.need_embeddings = need_embeddings
        self.window = window
        self.raw = raw

    def half(self, name: str, consumer: int, num_consumers: int) -> Iterator[Half] | None:
        """The infinite micro-batches of half `name` ("l" or "u") of one consumer; None if the half is not read."""
        parts, micro = self.halves[name]
        if not parts or micro == 0:
            return None
        readers = [_PartReader(p, self.window, self.view_sampling, self.eta, self.need_embeddings, self.sparse[name]) for p in parts]
        records = consumer_records(
            [[s.count for s in p.dataset.shards] for p in parts], [p.usable for p in parts],
            stream=name, seed=self.seed, consumer=consumer, num_consumers=num_consumers, window=self.window,
            valid_per_shard=[p.usable_per_shard for p in parts], start=self.start_item * micro,  # resume: seek, no decoding
        )
        return self._batches(name, readers, records, micro)

    def targets_power(self, name: str) -> float:
        """eta_cache / eta of a sparse half: its targets are re-tempered from the cache's eta to the run's."""
        return self.halves[name][0][0].cache_eta / self.eta

    def _batches(self, name: str, readers: list[_PartReader], records: Iterator[Record], micro: int) -> Iterator[Half]:
        sparse = self.sparse[name]
        while True:
            images, labels, probs, embs, index = [], [], [], [], []
            datas, exts, params = [], [], []  # raw mode
            for _ in range(micro):
                r = next(records)
                reader = readers[r.part]
                info = reader.ds.shards[r.shard]
                sample = reader.sample(r.shard, r.pos)
                num_views = reader.train_views
                if self.view_sampling == "cycle":
                    view = r.pass_ % num_views
                else:
                    view = _seed_of(self.seed, sample.key, r.pass_, "view") % num_views
                block = reader.block(view, r.shard)
                if self.raw:  # decoded on the device by the loop
                    datas.append(sample.data)
                    exts.append(sample.ext)
                    params.append(np.asarray(block["params"][r.pos], dtype=np.int32))  # (5,)
                else:
                    where = f"{info.name} key {sample.key!r}"
                    image, box = data.decode_view(sample.data, sample.ext, where, block["params"][r.pos], self.size)
                    image = data.replay_view_uint8(image, box, self.size, self.interpolation)  # (3, S, S) uint8
                    # the cache's strong augmentation: the program of (cache seed, key, view), as the teacher's
                    images.append(augment_view(image, reader.part.augment, reader.part.view_seed, sample.key, view))
                labels.append(int(reader.ds.labels[info.offset + r.pos]))
                probs.append((block["topk_idx"][r.pos], block["topk_val"][r.pos]) if sparse else block["probs"][r.pos])
                if self.need_embeddings:
                    embs.append(block["emb"][r.pos])
                index.append(info.offset + r.pos)
            topk = (torch.from_numpy(np.stack([i for i, _ in probs])),  # (b, K) int64: densified on the device by the loop
                    torch.from_numpy(np.stack([v for _, v in probs]))) if sparse else (None, None)  # (b, K) float32
            yield Half(
                label=torch.tensor(labels, dtype=torch.long),  # (b,)
                index=torch.tensor(index, dtype=torch.long),  # (b,)
                image=None if self.raw else torch.stack(images),  # (b, 3, S, S) uint8, normalised on the device
                probs=None if sparse else torch.from_numpy(np.stack(probs).astype(np.float32, copy=False)),  # (b, C)
                topk_idx=topk[0], topk_val=topk[1],
                emb=torch.from_numpy(np.stack(embs).astype(np.float32, copy=False)) if self.need_embeddings else None,  # (b, D)
                data=datas if self.raw else None, ext=exts if self.raw else None,  # raw: decoded on the device by the loop
                params=torch.from_numpy(np.stack(params)) if self.raw else None,  # (b, 5) int32
            )

    def densify(self, name: str, half: Half, num_classes: int) -> Half:
        """A sparse half's top-k rows -> dense `probs` (b, C) on their device; a dense half as it is."""
        if half.topk_idx is None:
            return half
        probs = retemper(densify_topk(half.topk_idx, half.topk_val, num_classes), self.targets_power(name))  # (b, C)
        return half._replace(probs=probs, topk_idx=None, topk_val=None)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise ConfigError(f"stream built for {self.num_workers} workers but the DataLoader has {info.num_workers}")
        consumer = self.rank * self.num_workers + worker
        num_consumers = self.world_size * self.num_workers
        if info is not None:
            torch.set_num_threads(1)  # decoding workers: one thread each, the main process keeps the rest
        labeled, unlabeled = self.half("l", consumer, num_consumers), self.half("u", consumer, num_consumers)
        while True:
            l = next(labeled) if labeled is not None else None  # noqa: E741 (the paper's l and u)
            yield Batch(l, next(unlabeled) if unlabeled is not None else None)
