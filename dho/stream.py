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
(`data.decode_view` + `data.replay_view_uint8`), i.e. the student sees the view the teacher saw.
Workers yield uint8 images (a quarter of the bytes through shared and pinned memory); the loop
normalises them on the device with the student's mean/std (`data.normalize`). With `raw=True`
(`dho distill --decode gpu`) workers decode nothing: they yield each sample's encoded bytes, its
extension and the cached view params, and the loop decodes the batch on the device
(`gpu_views.decode_views`).

Out of scope: images are read per shard into memory (a window of `window` shards per consumer);
very large shards need a smaller window.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dho import data
from dho.errors import ConfigError


@dataclass(frozen=True)
class Part:
    """One dataset with its teacher cache, as a member of a stream; `exclude` keys are never drawn."""

    dataset_path: Path
    cache_path: Path
    exclude: tuple[str, ...] = ()

    def usable(self, keys: list[str], valid: np.ndarray) -> np.ndarray:
        """(N,) bool: valid in the cache and not excluded."""
        if not self.exclude:
            return np.asarray(valid, dtype=bool)
        excluded = set(self.exclude)
        return np.asarray(valid, dtype=bool) & ~np.fromiter((k in excluded for k in keys), dtype=bool, count=len(keys))


@dataclass(frozen=True)
class Record:
    """One sample of a consumer's order: which part, shard and position, in which pass."""

    part: int
    shard: int
    pos: int
    pass_: int


def _seed_of(*items) -> int:
    """A stable 63-bit seed from any printable items (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256("|".join(str(x) for x in items).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def consumer_records(
    shard_counts: list[list[int]],
    valid: list[np.ndarray],
    *,
    stream: str,
    seed: int,
    consumer: int,
    num_consumers: int,
    window: int,
) -> Iterator[Record]:
    """The infinite, deterministic order of records for one consumer (no I/O).

    shard_counts[part][shard] = samples in that shard; valid[part] = (N_part,) bool, False for
    samples the teacher cache marked unreadable (they are never yielded).
    """
    shards = [(p, s) for p, counts in enumerate(shard_counts) for s in range(len(counts))]
    offsets = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) if c else np.zeros(0, int) for c in shard_counts]
    if sum(int(v.sum()) for v in valid) == 0:
        raise ConfigError(f"the {stream} stream has no usable samples (empty datasets or every sample invalid in the cache)")

    def shard_records(p: int, s: int, pass_: int) -> list[Record]:
        off = offsets[p][s]
        return [Record(p, s, i, pass_) for i in range(shard_counts[p][s]) if valid[p][off + i]]

    valid_per_shard = [int(valid[p][offsets[p][s] : offsets[p][s] + shard_counts[p][s]].sum()) for p, s in shards]
    total = sum(valid_per_shard)
    if total < num_consumers:
        raise ConfigError(
            f"the {stream} stream has {total} usable samples for {num_consumers} data consumers (ranks x workers); "
            "use fewer --workers or ranks"
        )
    lo, hi = consumer * total // num_consumers, (consumer + 1) * total // num_consumers  # my chunk of the pass

    pass_ = 0
    while True:
        rng = np.random.default_rng(_seed_of(seed, stream, "pass", pass_))
        order = rng.permutation(len(shards))
        local = np.random.default_rng(_seed_of(seed, stream, "pass", pass_, "consumer", consumer))
        mine, start = [], 0  # my chunk, grouped by shard
        for i in order:
            n = valid_per_shard[i]
            if n and start < hi and start + n > lo:
                mine.append(shard_records(*shards[i], pass_)[max(lo - start, 0) : min(hi - start, n)])
            start += n
        for w in range(0, len(mine), window):
            records = [r for group in mine[w : w + window] for r in group]
            for i in local.permutation(len(records)):
                yield records[i]
        pass_ += 1


class _PartReader:
    """Reads shards and (view, shard) cache blocks of one part, keeping a few in memory."""

    def __init__(self, part: Part, keep: int, eta: float, need_embeddings: bool):
        from dho.cache import TeacherCache

        self.ds = data.Dataset.open(part.dataset_path)
        self.cache = TeacherCache.open(part.cache_path, dataset=self.ds)
        self.eta = eta
        self.need_embeddings = need_embeddings
        self.keep = keep
        self._shards: OrderedDict[int, list] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], dict] = OrderedDict()
        # the augmented views; an optional center (evaluation) view is stored last and not trained on
        self.train_views = self.cache.num_views - int(bool(self.cache.attrs.get("center_view", False)))

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
            block = {
                "probs": self.cache.probs(view, start, stop, eta=self.eta),  # (n, C) float32
                "params": self.cache.view_params(view, start, stop),  # (n, 5) int32
            }
            if self.need_embeddings:
                block["emb"] = self.cache.embeddings(view, start, stop)  # (n, D)
            self._blocks[key] = block
            while len(self._blocks) > self.keep * 2:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(key)
        return self._blocks[key]


class PairedStream(IterableDataset):
    """Yields one micro-batch dict per step for this consumer: labeled and/or unlabeled halves.

    Keys (present when the half is used): `l_image` (b_l, 3, S, S) uint8, `l_label` (b_l,),
    `l_probs` (b_l, C), `l_emb` (b_l, D); `u_image`, `u_probs`, `u_emb` likewise; `u_index`/`l_index`
    (global rows, for debugging and tests). With `raw=True`, `l_data` (list of b_l encoded images),
    `l_ext` (list of b_l extensions) and `l_params` (b_l, 5) int32 view params replace `l_image`.
    """

    def __init__(
        self,
        labeled: list[Part],
        unlabeled: list[Part],
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
        self.halves = {"l": (labeled, micro_l), "u": (unlabeled, micro_u)}
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers = max(num_workers, 1)
        self.start_item = start_item
        self.view_sampling = view_sampling
        self.size, self.interpolation = image_size, interpolation
        self.eta = eta
        self.need_embeddings = need_embeddings
        self.window = window
        self.raw = raw

    def _half(self, name: str, consumer: int, num_consumers: int) -> Iterator[dict] | None:
        parts, micro = self.halves[name]
        if not parts or micro == 0:
            return None
        readers = [_PartReader(p, keep=self.window + 1, eta=self.eta, need_embeddings=self.need_embeddings) for p in parts]
        records = consumer_records(
            [[s.count for s in r.ds.shards] for r in readers],
            [p.usable(r.ds.keys, r.cache.valid) for p, r in zip(parts, readers)],
            stream=name, seed=self.seed, consumer=consumer, num_consumers=num_consumers, window=self.window,
        )
        for _ in range(self.start_item * micro):  # resume: skip already-consumed records, no decoding
            next(records)
        return self._batches(name, readers, records, micro)

    def _batches(self, name: str, readers: list[_PartReader], records: Iterator[Record], micro: int) -> Iterator[dict]:
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
                    params.append(torch.as_tensor(np.asarray(block["params"][r.pos], dtype=np.int32)))  # (5,)
                else:
                    where = f"{info.name} key {sample.key!r}"
                    image, box = data.decode_view(sample.data, sample.ext, where, block["params"][r.pos], self.size)
                    images.append(data.replay_view_uint8(image, box, self.size, self.interpolation))  # (3, S, S) uint8
                labels.append(int(reader.ds.labels[info.offset + r.pos]))
                probs.append(torch.from_numpy(np.asarray(block["probs"][r.pos], dtype=np.float32)))
                if self.need_embeddings:
                    embs.append(torch.from_numpy(np.asarray(block["emb"][r.pos], dtype=np.float32)))
                index.append(info.offset + r.pos)
            if self.raw:
                batch = {f"{name}_data": datas, f"{name}_ext": exts, f"{name}_params": torch.stack(params)}  # params (b, 5)
            else:
                batch = {f"{name}_image": torch.stack(images)}  # (b, 3, S, S) uint8, normalised on the device
            batch.update({
                f"{name}_label": torch.tensor(labels, dtype=torch.long),  # (b,)
                f"{name}_probs": torch.stack(probs),  # (b, C)
                f"{name}_index": torch.tensor(index, dtype=torch.long),  # (b,)
            })
            if self.need_embeddings:
                batch[f"{name}_emb"] = torch.stack(embs)  # (b, D)
            yield batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.num_workers:
            raise ConfigError(f"stream built for {self.num_workers} workers but the DataLoader has {info.num_workers}")
        consumer = self.rank * self.num_workers + worker
        num_consumers = self.world_size * self.num_workers
        if info is not None:
            torch.set_num_threads(1)  # decoding workers: one thread each, the main process keeps the rest
        halves = [h for h in (self._half("l", consumer, num_consumers), self._half("u", consumer, num_consumers)) if h]
        while True:
            batch: dict = {}
            for h in halves:
                batch.update(next(h))
            yield batch
