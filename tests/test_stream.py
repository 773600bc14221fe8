"""The training order: every pass covers each valid sample exactly once over all consumers."""

from collections import Counter
from itertools import islice

import numpy as np
import pytest

from dho.errors import ConfigError
from dho.stream import consumer_records


def _pass_records(shard_counts, valid, num_consumers, window=2, seed=0, passes=2):
    """Records of the first `passes` passes of every consumer, keyed by pass."""
    total = sum(int(v.sum()) for v in valid)
    by_pass: dict[int, Counter] = {}
    for c in range(num_consumers):
        it = consumer_records(shard_counts, valid, stream="u", seed=seed, consumer=c, num_consumers=num_consumers, window=window)
        # enough records to cover `passes` passes for this consumer (consumers hold ~total / C each)
        for r in islice(it, passes * total):
            if r.pass_ < passes:
                by_pass.setdefault(r.pass_, Counter())[(r.part, r.shard, r.pos)] += 1
    return by_pass, total


@pytest.mark.parametrize("num_consumers", [1, 2, 3, 7])
def test_each_pass_covers_every_valid_sample_once(num_consumers):
    shard_counts = [[5, 5, 3], [4, 4]]  # two parts (e.g. unlabeled + labeled), uneven last shard
    valid = [np.ones(13, bool), np.ones(8, bool)]
    valid[0][6] = False  # marked unreadable in the cache: never yielded
    by_pass, total = _pass_records(shard_counts, valid, num_consumers)
    for p in (0, 1):
        seen = by_pass[p]
        assert sum(seen.values()) == total == 20
        assert set(seen.values()) == {1}
        assert (0, 1, 1) not in seen  # global row 6 of part 0 = shard 1, position 1


def test_order_is_deterministic_and_depends_on_seed_and_pass():
    counts, valid = [[6, 6, 6, 6]], [np.ones(24, bool)]
    take = lambda seed: [(r.shard, r.pos, r.pass_) for r in islice(consumer_records(counts, valid, stream="l", seed=seed, consumer=0, num_consumers=2, window=2), 36)]
    assert take(0) == take(0)
    assert take(0) != take(1)
    first, second = [x[:2] for x in take(0)[:12]], [x[:2] for x in take(0)[12:24]]
    assert first != second  # each pass reshuffles


def _one_pass(counts, num_consumers, window, seed=3):
    """Each consumer's records of pass 0 (a pass holds at most total // C + 1 records per consumer)."""
    valid = [np.ones(sum(c), bool) for c in counts]
    total = sum(sum(c) for c in counts)
    out = []
    for c in range(num_consumers):
        it = consumer_records(counts, valid, stream="u", seed=seed, consumer=c, num_consumers=num_consumers, window=window)
        out.append([r for r in islice(it, total // num_consumers + 1) if r.pass_ == 0])
    return out


def _shard_loads(records, keep):
    """How often a reader with an LRU of `keep` shards loads a shard while following `records`."""
    lru, loads = [], 0
    for r in records:
        if (r.part, r.shard) in lru:
            lru.remove((r.part, r.shard))
        else:
            loads += 1
        lru.append((r.part, r.shard))
        del lru[:-keep]
    return loads


@pytest.mark.parametrize("counts,num_consumers", [
    ([[4] * 6], 3),          # chunks are whole shards
    ([[4] * 7], 3),          # 28 samples: chunks of 9, 9, 10 cut through shards
    ([[10, 10]], 5),         # fewer shards than consumers: neighbours share a shard
    ([[1000] * 13], 16),     # ImageNet-1%-like labeled split on 2 GPUs x 8 workers
    ([[5, 5, 3], [4, 4]], 4),
])
def test_chunks_are_balanced_and_read_each_shard_once(counts, num_consumers):
    window = 2
    per_consumer = _one_pass(counts, num_consumers, window)
    sizes = [len(r) for r in per_consumer]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(sum(c) for c in counts)
    num_shards = sum(len(c) for c in counts)
    touched = [{(r.part, r.shard) for r in recs} for recs in per_consumer]
    # a chunk is contiguous in the pass's shard order: all shards are read once, plus one per cut
    assert sum(len(t) for t in touched) <= num_shards + num_consumers - 1
    for recs, shards in zip(per_consumer, touched):
        assert _shard_loads(recs, keep=window + 1) == len(shards)  # the reader's LRU never reloads a shard


def test_every_consumer_needs_a_sample():
    with pytest.raises(ConfigError, match="3 usable samples for 4 data consumers"):
        next(consumer_records([[3]], [np.ones(3, bool)], stream="l", seed=0, consumer=0, num_consumers=4, window=2))


def test_no_usable_samples_is_an_error():
    with pytest.raises(ConfigError, match="no usable samples"):
        next(consumer_records([[3]], [np.zeros(3, bool)], stream="u", seed=0, consumer=0, num_consumers=1, window=2))


def test_usable_counts_per_shard_handle_empty_shards():
    from dho.stream import count_per_shard

    valid = np.array([1, 0, 1, 1, 1, 0, 1], dtype=bool)
    counts = [2, 0, 3, 0, 2]
    assert count_per_shard(valid, counts).tolist() == [1, 0, 3, 0, 1]
    assert count_per_shard(np.zeros(0, bool), [0, 0]).tolist() == [0, 0]


@pytest.mark.parametrize("num_consumers,window", [(1, 2), (3, 1), (2, 3)])
def test_start_seeks_to_the_records_the_full_order_yields_after_it(num_consumers, window):
    """Resume: `start` skips records by arithmetic (passes) and by drawing the skipped windows' permutations only,
    and yields exactly what the unskipped order yields after its first `start` records (bit-identical resume)."""
    counts = [[5, 7, 0, 4, 6], [3, 3]]  # two parts, an empty shard, uneven shards
    valid = [np.ones(22, bool), np.ones(6, bool)]
    valid[0][[1, 8, 9]] = False  # never drawn
    for c in range(num_consumers):
        full = list(islice(consumer_records(counts, valid, stream="u", seed=5, consumer=c, num_consumers=num_consumers,
                                            window=window), 120))
        for start in (0, 1, 4, 7, 11, 24, 25, 50, 63):  # inside and at the edges of windows and passes
            seek = consumer_records(counts, valid, stream="u", seed=5, consumer=c, num_consumers=num_consumers,
                                    window=window, start=start)
            assert list(islice(seek, 120 - start)) == full[start:], (c, start)


def test_key_set_gives_np_isin_answers_even_when_hashes_collide(monkeypatch):
    """`data.KeySet` (the union check and --unlabeled-pool exclude-labeled) answers as np.isin does, for keys of
    different widths, empty sets and keys, and with a hash so weak every key collides with others."""
    from dho import data
    from dho.data import manifest

    rng = np.random.default_rng(0)

    def keys(n, longest):
        names = list(dict.fromkeys(f"n{rng.integers(0, 300)}/{'x' * int(rng.integers(0, longest))}" for _ in range(n)))
        return data.encode_strings(names) if names else np.zeros(0, "S1")

    strong = manifest._key_hashes
    for weak in (False, True):
        if weak:
            monkeypatch.setattr(manifest, "_key_hashes", lambda k, w: strong(k, w) % np.uint64(5))
        for n, m in [(0, 0), (0, 9), (9, 0), (200, 50), (60, 200), (300, 300)]:
            pool, labeled = keys(n, 12), keys(m, 20)  # different widths: S{~16} and S{~24}
            ks = data.KeySet(labeled)
            assert ks.contains(pool).tolist() == np.isin(pool, labeled).tolist()
            assert ks.within(pool) == bool(np.isin(labeled, pool).all())
            assert ks.within(labeled)
            rows = ks.rows(pool)
            assert (labeled[rows[rows >= 0]] == pool[rows >= 0]).all() and ((rows >= 0) == np.isin(pool, labeled)).all()
        dup = data.encode_strings(["a", "b", "c", "b", "d", "a", "b"])
        assert data.first_duplicate(dup) == (1, 3) and data.first_duplicate(dup[:3]) is None
