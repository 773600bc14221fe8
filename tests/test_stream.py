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


def test_whole_shards_per_consumer_when_enough_shards():
    counts, valid = [[4] * 6], [np.ones(24, bool)]
    shards_of = []
    for c in range(3):
        recs = list(islice(consumer_records(counts, valid, stream="u", seed=3, consumer=c, num_consumers=3, window=1), 8))
        assert {r.pass_ for r in recs} == {0}
        shards_of.append({r.shard for r in recs})
    assert all(len(s) == 2 for s in shards_of)  # 6 shards / 3 consumers, whole shards
    assert set.union(*shards_of) == set(range(6))


def test_no_usable_samples_is_an_error():
    with pytest.raises(ConfigError, match="no usable samples"):
        next(consumer_records([[3]], [np.zeros(3, bool)], stream="u", seed=0, consumer=0, num_consumers=1, window=2))
