"""dho.cache: layout, schema checks, unit writes, readers (dense, top-k, re-tempering), mismatches."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers_data import make_image_folder

import cache_schemas
from dho import data
from dho.cache import TeacherCache, densify_topk, retemper
from dho.cache_layout import chunk_length, row_bytes, shard_group, store_files
from dho.errors import CacheError

README = Path(cache_schemas.__file__).parent / "README.md"


def _attrs(ds, views=2, topk=None, store_embeddings=False, eta=2.0, D=4) -> dict:
    counts = [s.count for s in ds.shards]
    return {
        "dataset_fingerprint": ds.fingerprint, "num_samples": ds.num_samples, "classnames": list(ds.classnames),
        "num_views": views, "center_view": False, "seed": 0, "zeta": 0.01, "eta": eta,
        "teacher": {"model": "m", "pretrained": "none", "weights_sha256": "a" * 64, "model_config_sha256": "b" * 64,
                    "prompt_names": "underscores-to-spaces"},
        "templates": ["a photo of a {}."], "text_classifier_norm": "renormalize",
        "preprocess": {"image_size": 32, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
                       "resize_mode": "squash", "source": "test"},
        "precision": "fp32", "topk": topk, "store_embeddings": store_embeddings, "embed_dim": D,
        "shard_counts": counts, "chunk_len": chunk_length(counts),
    }


def BOXES(n: int) -> np.ndarray:
    """(n, 5) crop boxes (top, left, height, width, flip) of a 4 x 4 region, unflipped."""
    return np.tile(np.array([0, 0, 4, 4, 0], dtype=np.int32), (n, 1))


def _create(path, ds, **kw) -> TeacherCache:
    tc = np.eye(ds.num_classes, 4, dtype=np.float32)
    return TeacherCache.create_or_open(path, _attrs(ds, **kw), ds.keys, ds.labels, tc, dataset=ds)


def _logits(rng, n, c):
    return rng.normal(size=(n, c)) * 3.0


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_chunk_length_makes_every_shard_whole_chunks():
    assert chunk_length([5, 5, 5, 5, 4]) == 5  # prepare's layout: one chunk per shard, last partial
    assert chunk_length([1000, 1000, 167]) == 1000
    assert chunk_length([4, 6, 8]) == 2
    assert chunk_length([7]) == 7
    for counts in ([4, 6, 8], [6, 9, 3, 5], [5, 5, 5, 5, 4]):
        L = chunk_length(counts)
        assert all(off % L == 0 for off in np.cumsum([0] + counts[:-1]))


def test_units_roundtrip_with_plain_zarr_and_done_guard(tmp_path, tiny_dataset):
    ds = tiny_dataset  # 24 samples in shards of 5, 5, 5, 5, 4; 3 classes
    cache = _create(tmp_path / "c.zarr", ds, store_embeddings=True)
    rng = np.random.default_rng(0)
    p = _softmax(_logits(rng, 5, 3)).astype(np.float16)  # (5, C)
    vp = np.array([[r, r + 1, 10 + r, 12 + r, r % 2] for r in range(5)], dtype=np.int32)  # (5, 5) boxes + flips
    emb = rng.normal(size=(5, 4)).astype(np.float16)
    cache.write_valid(1, np.array([True, True, False, True, True]))
    cache.write_unit(0, 1, view_params=vp, probs=p, embeddings=emb)
    assert cache.done.tolist() == [[False, True, False, False, False], [False] * 5]
    np.testing.assert_array_equal(cache.probs(0, 5, 10), p.astype(np.float32))
    np.testing.assert_array_equal(cache.view_params(0, 5, 10), vp)
    np.testing.assert_array_equal(cache.embeddings(0, 5, 10), emb.astype(np.float32))
    assert cache.valid[5:10].tolist() == [True, True, False, True, True] and not cache.valid[:5].any()
    with pytest.raises(CacheError, match="view 1 of shard 1 .* not computed yet; re-run"):
        cache.probs(1, 5, 10)
    with pytest.raises(CacheError, match="view 0 of shard 2"):
        cache.probs(0, 8, 12)
    # the store is plain Zarr v3 (v4: one inner chunk per (view, shard) unit, in one Zarr shard per view and
    # group of G = 5 dataset shards here; the done flags of a group in one chunk)
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert cache.shard_group == 5 and g.attrs["shard_group"] == 5
    assert g["probs"].chunks == (1, 5, 3) and g["probs"].shards == (1, 25, 3) and g["done"].chunks == (2, 5)
    keys = g["keys"][:]  # (N, W) uint8: UTF-8, zero-padded (schema v3)
    assert [bytes(k).rstrip(b"\0").decode() for k in keys] == ds.keys and g["labels"][:].tolist() == ds.labels.tolist()
    assert sorted(str(p.relative_to(tmp_path / "c.zarr" / "probs")) for p in (tmp_path / "c.zarr" / "probs").rglob("*")
                  if p.is_file()) == ["c/0/0/0", "zarr.json"]
    assert sorted(p.name for p in (tmp_path / "c.zarr" / "done" / "c").rglob("*") if p.is_file()) == ["0"]
    assert not cache.finalize() and "complete" not in g.attrs


def test_finalize_and_stray_partial_files(tmp_path, tiny_dataset):
    ds = tiny_dataset
    cache = _create(tmp_path / "c.zarr", ds, views=1)
    chunk = tmp_path / "c.zarr" / "probs" / "c" / "0" / "0" / "0"  # the Zarr shard of view 0, shards 0-4 (G = 5)
    chunk.parent.mkdir(parents=True)
    stray = chunk.parent / "0.deadbeef.partial"  # what a writer killed mid-write leaves behind
    stray.write_bytes(b"junk")
    for s in range(5):
        n = ds.shards[s].count
        cache.write_valid(s, np.ones(n, bool))
        cache.write_unit(0, s, view_params=BOXES(n), probs=np.full((n, 3), 1 / 3, np.float16))
    assert not stray.exists() and chunk.is_file()
    assert cache.finalize() and cache.is_complete()
    reopened = TeacherCache.open(tmp_path / "c.zarr", dataset=ds)
    assert reopened.is_complete() and reopened.attrs["complete"] is True


def test_topk_densify_and_exact_retempering(tmp_path, tiny_dataset):
    rng = np.random.default_rng(1)
    logits = _logits(rng, 6, 5)
    p = _softmax(logits / 2.0)  # stored at eta = 2
    # re-tempering p^(eta/eta') / sum == softmax(logits / eta')
    np.testing.assert_allclose(retemper(p, 2.0 / 0.5), _softmax(logits / 0.5), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(retemper(p, 2.0 / 4.0), _softmax(logits / 4.0), rtol=1e-5, atol=1e-7)
    # top-2 of 5 classes: remainder spread uniformly over the 3 others
    idx = np.argsort(-p, axis=1)[:, :2]
    val = np.take_along_axis(p, idx, axis=1).astype(np.float32)
    dense = densify_topk(idx, val, 5)
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(dense, idx, axis=1), val)
    rest = np.ones_like(p, bool)
    np.put_along_axis(rest, idx, False, axis=1)
    np.testing.assert_allclose(dense[rest].reshape(6, 3), ((1 - val.sum(1)) / 3)[:, None].repeat(3, 1), rtol=1e-6)
    nan_row = densify_topk(np.array([[-1, -1]]), np.full((1, 2), np.nan, np.float32), 5)
    assert np.isnan(nan_row).all()

    # through the store: a top-2 cache read back densified and re-tempered
    ds = tiny_dataset
    cache = _create(tmp_path / "k.zarr", ds, views=1, topk=2)
    assert "probs" not in cache.group and cache.group["topk_probs"].shape == (1, 24, 2)
    n = ds.shards[0].count
    lg = _logits(rng, n, 3)
    pp = _softmax(lg / 2.0)
    top = np.argsort(-pp, axis=1)[:, :2]
    cache.write_valid(0, np.ones(n, bool))
    cache.write_unit(0, 0, view_params=BOXES(n), topk_indices=top,
                     topk_probs=np.take_along_axis(pp, top, axis=1))
    got = cache.probs(0, 0, n)
    np.testing.assert_allclose(got, pp, atol=2e-3)  # with C - K = 1 the remainder is the 3rd class
    np.testing.assert_allclose(cache.probs(0, 0, n, eta=1.0), _softmax(lg / 1.0), atol=5e-3)


def test_retemper_is_exact():
    import torch

    logits = torch.tensor([[1.0, 2.0, -3.0, 0.5]])
    p2 = torch.softmax(logits / 2.0, -1)
    torch.testing.assert_close(retemper(p2, 2.0 / 1.0), torch.softmax(logits, -1))
    torch.testing.assert_close(retemper(p2, 2.0 / 4.0), torch.softmax(logits / 4.0, -1))
    zero = torch.tensor([[0.5, 0.5, 0.0]])
    assert retemper(zero, 2.0 / 1.0).tolist() == [[0.5, 0.5, 0.0]]


def _dense_targets_v1(idx, val, num_classes, power):
    """The training loop's top-k targets as dho computed them before the one densify/retemper pair (dho <= 0.1's
    stream.dense_targets), restated: the pair's torch path must give these numbers bit for bit."""
    import torch

    rest = num_classes - val.shape[1]
    remainder = (1.0 - val.sum(dim=1, keepdim=True)).clamp_min(0.0)
    fill = remainder / rest if rest > 0 else torch.zeros_like(remainder)
    dense = fill.expand(-1, num_classes).clone()
    dense.scatter_(1, idx, val)
    if power != 1.0:
        logp = torch.log(dense.double()) * power
        logp = logp - logp.masked_fill(~torch.isfinite(logp), -torch.inf).amax(dim=1, keepdim=True)
        q = torch.exp(logp)
        dense = (q / q.sum(dim=1, keepdim=True)).float()
    return dense


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_torch_densify_and_retemper_give_the_loops_targets_bit_for_bit(power):
    """The pair on torch tensors (what the training loop densifies on the device) equals the loop's former
    targets bit for bit, and the numpy reader's numbers to float32 rounding."""
    import torch

    g = torch.Generator().manual_seed(3)
    for n, C, K in ((64, 10, 3), (7, 1000, 5), (5, 4, 4)):
        p = torch.softmax(torch.randn(n, C, generator=g) * 4, dim=-1)  # (n, C)
        val, idx = torch.topk(p, K, dim=-1)  # (n, K) each
        val = val.half().float()  # what the cache stores and reads back
        val[0] = torch.tensor([1.0] + [0.0] * (K - 1))  # a row whose top-k holds all the mass
        got = retemper(densify_topk(idx, val, C), power)
        assert got.dtype == torch.float32 and got.shape == (n, C)
        assert torch.equal(got, _dense_targets_v1(idx, val, C, power))
        reader = retemper(densify_topk(idx.numpy(), val.numpy(), C), power)  # (n, C) numpy, as the cache reader
        np.testing.assert_allclose(got.numpy(), reader, rtol=1e-6, atol=1e-7)


def test_schema_checked_on_every_open(tmp_path, tiny_dataset):
    path = tmp_path / "c.zarr"
    _create(path, tiny_dataset)
    g = zarr.open_group(str(path), mode="r+")
    g.attrs.update({"schema_version": 9})
    with pytest.raises(CacheError, match="cache schema version 9, but dho .* reads version\\(s\\) 1, 2, 3, 4, 5"):
        TeacherCache.open(path)
    g.attrs.update({"schema_version": 1})  # v1 has no text_classifier_norm
    with pytest.raises(CacheError, match="do not match cache schema v1 at \\(top level\\): Additional properties"):
        TeacherCache.open(path)
    g.attrs.update({"schema_version": 3})  # v3 has no shard_group
    with pytest.raises(CacheError, match="schema v3 at \\(top level\\): Additional properties .*'shard_group' was unexpected"):
        TeacherCache.open(path)
    g.attrs.update({"schema_version": 4})  # v4 has no teacher.prompt_names
    with pytest.raises(CacheError, match="schema v4 at teacher: Additional properties .*'prompt_names' was unexpected"):
        TeacherCache.open(path)
    g.attrs.update({"schema_version": 6, "teacher": {**g.attrs["teacher"], "prompt_names": "other"}})
    with pytest.raises(CacheError, match="do not match cache schema v6 at teacher.prompt_names"):
        TeacherCache.open(path)
    g.attrs.update({"teacher": {**g.attrs["teacher"], "prompt_names": "underscores-to-spaces"}, "eta": -1})
    with pytest.raises(CacheError, match="do not match cache schema v6 at eta"):
        TeacherCache.open(path)
    g.attrs.update({"eta": 2.0, "text_classifier_norm": "other"})
    with pytest.raises(CacheError, match="do not match cache schema v6 at text_classifier_norm"):
        TeacherCache.open(path)
    g.attrs.update({"text_classifier_norm": "mean", "chunk_len": 3})
    with pytest.raises(CacheError, match="array 'probs' .* chunks \\(1, 5, 3\\) .*, but schema v6 requires .* chunks \\(1, 3, 3\\)"):
        TeacherCache.open(path)
    g.attrs.update({"chunk_len": 5, "shard_group": 1})
    with pytest.raises(CacheError, match="array 'probs' .* \\(shards \\(1, 25, 3\\)\\), but schema v6 requires .* \\(shards \\(1, 5, 3\\)\\)"):
        TeacherCache.open(path)
    g.attrs.update({"shard_group": 5})
    TeacherCache.open(path)
    g.attrs.update({"chunk_len": 5, "schema": "something-else"})
    with pytest.raises(CacheError, match="not a dho teacher cache"):
        TeacherCache.open(path)
    with pytest.raises(CacheError, match="no teacher cache here"):
        TeacherCache.open(tmp_path / "nothing.zarr")


def test_other_dataset_or_parameters_are_refused(tmp_path, tiny_dataset):
    path = tmp_path / "c.zarr"
    _create(path, tiny_dataset)
    # another class list
    other_src = make_image_folder(tmp_path / "imgs4", num_classes=4, per_class=6)
    other = data.prepare(other_src, tmp_path / "ds4", shard_size=5)
    with pytest.raises(CacheError, match="does not belong to dataset .*another class list \\(3 classes in the cache, 4"):
        TeacherCache.open(path, dataset=other)
    # same classes, other samples
    same_classes = data.prepare(make_image_folder(tmp_path / "imgs3", num_classes=3, per_class=7), tmp_path / "ds3", shard_size=5)
    with pytest.raises(CacheError, match="24 samples in the cache, 21 in the dataset"):
        TeacherCache.open(path, dataset=same_classes)
    # rerun with other settings on the same store: refused with every difference listed
    changed = dict(_attrs(tiny_dataset), num_views=3, seed=1)
    with pytest.raises(CacheError, match="other parameters \\(num_views: 2 in the cache vs 3 now; seed: 0 in the cache vs 1 now\\)"):
        TeacherCache.create_or_open(path, changed, tiny_dataset.keys, tiny_dataset.labels, np.zeros((3, 4), np.float32))
    # the same settings (another preprocess `source` wording is fine) reopen for writing
    same = _attrs(tiny_dataset)
    same["preprocess"] = dict(same["preprocess"], source="said differently")
    assert TeacherCache.create_or_open(path, same, tiny_dataset.keys, tiny_dataset.labels, np.zeros((3, 4), np.float32)).mode == "r+"


def test_concurrent_creation_is_race_safe(tmp_path, tiny_dataset):
    path = tmp_path / "c.zarr"
    with ThreadPoolExecutor(4) as pool:
        caches = list(pool.map(lambda _: _create(path, tiny_dataset), range(4)))
    assert all(c.attrs["created_at"] == caches[0].attrs["created_at"] for c in caches)
    assert [p.name for p in tmp_path.iterdir()] == ["c.zarr"]  # no temporary folders left
    assert TeacherCache.open(path, dataset=tiny_dataset).keys == tiny_dataset.keys


def _readme_tables() -> tuple[dict, set]:
    arrays, attrs, section = {}, set(), None
    for line in README.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].split()[0].lower()
        m = re.match(r"\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", line)
        if m and section == "arrays":
            arrays[m.group(1)] = (m.group(2).strip(), m.group(3).strip())
        elif m and section == "attributes":
            attrs.add(m.group(1))
    return arrays, attrs


def test_readme_and_json_schema_document_the_same_layout(tmp_path, tiny_dataset):
    arrays, attrs = _readme_tables()
    schema = cache_schemas.load_schema(cache_schemas.CURRENT_VERSION)
    assert set(attrs) == set(schema["properties"])
    table = schema["x-dho-arrays"]
    assert set(arrays) == set(table)
    for name, (shape, dtype) in arrays.items():
        assert dtype == table[name]["dtype"], name
        assert shape == "(" + ", ".join(map(str, table[name]["shape"])) + ("," if len(table[name]["shape"]) == 1 else "") + ")", name
    # and a real store has exactly those arrays and attributes
    cache = _create(tmp_path / "c.zarr", tiny_dataset, store_embeddings=True)
    assert cache.finalize() is False
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert set(g.array_keys()) == set(arrays) - {"topk_indices", "topk_probs"}
    assert set(g.attrs) == attrs - {"complete", "teachers", "augment"}  # `teachers`: ensembles only (v6); `augment`: --augment only (v7)
    assert json.loads((tmp_path / "c.zarr" / "zarr.json").read_text())["attributes"]["schema"] == "dho-teacher-cache"


def test_a_schema_v1_cache_stays_readable_and_resumable(tmp_path):
    """tests/assets/v1-cache was written by dho 0.1.0: it opens, reads, summarises and resumes unchanged."""
    import shutil
    import subprocess
    import sys

    asset = Path(__file__).parent / "assets" / "v1-cache"
    shutil.copytree(asset, tmp_path / "v1")
    ds = data.Dataset.open(tmp_path / "v1" / "dataset")
    cache = TeacherCache.open(tmp_path / "v1" / "cache.zarr", dataset=ds)
    assert cache.attrs["schema_version"] == 1 and cache.is_complete()
    assert cache.attrs["text_classifier_norm"] == "renormalize"  # v1 knew only the re-normalised classifier
    np.testing.assert_allclose(np.linalg.norm(cache.text_classifier, axis=1), 1.0, atol=1e-5)
    for view in range(cache.num_views):
        p = cache.probs(view, 0, cache.num_samples)  # (N, C)
        assert np.isfinite(p).all() and (p >= 0).all()
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=2e-3)
    from dho.cache_info import summarize

    info = summarize(tmp_path / "v1" / "cache.zarr")
    assert info["schema_version"] == 1 and info["complete"] and info["text_classifier_norm"] == "renormalize"
    # the same precompute command finds it complete and changes nothing
    before = {f: f.read_bytes() for f in (tmp_path / "v1" / "cache.zarr").rglob("*") if f.is_file()}
    dho = str(Path(sys.executable).parent / "dho")
    proc = subprocess.run([dho, "precompute-teacher", str(tmp_path / "v1" / "dataset"), "--out", str(tmp_path / "v1" / "cache.zarr"),
                           "--model", str(Path(__file__).parent / "assets" / "tiny-clip.json"), "--pretrained", "none",
                           "--templates", "simple", "--views", "2", "--center-view", "--device", "cpu", "--workers", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    after = {f: f.read_bytes() for f in (tmp_path / "v1" / "cache.zarr").rglob("*") if f.is_file()}
    assert after == before


def test_a_finished_v4_cache_opens_without_reading_a_done_flag(tmp_path, tiny_dataset):
    """Completeness is one attribute: a complete store's done flags are not read (O(1) in N), and readers
    of an unfinished one see the flags; refresh() sees another process's finalisation."""
    ds = tiny_dataset
    cache = _create(tmp_path / "c.zarr", ds, views=1)
    for s in range(5):
        n = ds.shards[s].count
        cache.write_valid(s, np.ones(n, bool))
        cache.write_unit(0, s, view_params=BOXES(n), probs=np.full((n, 3), 1 / 3, np.float16))
    reader = TeacherCache.open(tmp_path / "c.zarr")
    assert reader.done.all() and "done" in reader._arrays and not reader.is_complete()  # unfinished: the flags are read
    assert cache.finalize()
    reader.refresh()
    assert reader.is_complete()
    fresh = TeacherCache.open(tmp_path / "c.zarr", dataset=ds)
    assert fresh.is_complete() and fresh.done.all() and fresh.valid.all() and "done" not in fresh._arrays
    assert "keys" not in fresh._arrays  # the dataset check matched fingerprints: no key was read


def test_cache_info_top1_of_a_topk_cache_is_the_densified_argmax_without_densifying(tmp_path, tiny_dataset, monkeypatch):
    """`dho cache-info`'s agreement reads a top-k row's top-1 from its K stored entries (O(N K), not O(N C)): the
    same class as the densified row's argmax, also for ties (the smallest class index) and for rows whose
    spread remainder reaches the top value, and the same agreement as densifying every row, top-k and dense."""
    import dho.cache_info as cache_info

    ds = tiny_dataset  # 24 samples in shards of 5, 5, 5, 5, 4; 3 classes
    rng = np.random.default_rng(3)
    topk = _create(tmp_path / "k.zarr", ds, views=1, topk=2)
    dense = _create(tmp_path / "d.zarr", ds, views=1)
    # plain, a tie (the smaller class wins), the remainder wins, near uniform (float16 thirds), the remainder ties
    crafted = [([2, 0], [0.7, 0.2]), ([2, 1], [0.4, 0.4]), ([1, 2], [0.3, 0.2]), ([0, 1], [1 / 3, 1 / 3]), ([2, 1], [0.375, 0.25])]
    for s, shard in enumerate(ds.shards):
        n = shard.count
        p = _softmax(_logits(rng, n, 3))  # (n, C)
        idx = np.argsort(-p, axis=1)[:, :2]
        val = np.take_along_axis(p, idx, axis=1)
        if s == 0:
            for r, (i, v) in enumerate(crafted):
                idx[r], val[r] = i, v
        valid = np.ones(n, bool)
        valid[n - 1] = s != 1  # an unreadable sample in shard 1: NaN / -1 rows
        idx[~valid], val[~valid], p[~valid] = -1, np.nan, np.nan
        for cache in (topk, dense):
            cache.write_valid(s, valid)
        topk.write_unit(0, s, view_params=BOXES(n), topk_indices=idx, topk_probs=val)
        dense.write_unit(0, s, view_params=BOXES(n), probs=p)
    for cache in (topk, dense):
        assert cache.finalize()
        assert store_files(cache.attrs) == sum(1 for f in cache.path.rglob("*") if f.is_file())  # the layout's file count
    calls = []
    real = cache_info.densify_topk
    monkeypatch.setattr(cache_info, "densify_topk", lambda i, v, c: calls.append(len(i)) or real(i, v, c))
    got = cache_info.top1(topk, 0, 0, 5)
    assert got.tolist() == [2, 1, 0, 2, 0] and calls == [3]  # only the rows the remainder reaches are densified
    for cache in (topk, dense):
        for s in range(5):
            start, stop = cache.shard_range(s)
            ok = cache.valid[start:stop]
            np.testing.assert_array_equal(cache_info.top1(cache, 0, start, stop)[ok], cache.probs(0, start, stop).argmax(axis=1)[ok])
        new = cache_info.summarize(cache.path)
        monkeypatch.setattr(cache_info, "top1", lambda c, v, a, b: c.probs(v, a, b).argmax(axis=1))  # what cache-info did before
        old = cache_info.summarize(cache.path)
        monkeypatch.undo()
        assert (new["agreement"], new["agreement_count"]) == (old["agreement"], old["agreement_count"]) and new["agreement_count"] == 23


def test_store_files_at_imagenet_21k_scale_are_the_numbers_the_readmes_give():
    """14,197,122 samples in 1000-sample shards, 21,841 classes, 16 views: a dense unit is 43.7 MB, over the 1 MiB of
    a Zarr shard, so G = 1 (a file per view and shard); top-10 rows are 40 bytes, G = 26."""
    n, counts = 14_197_122, [1000] * 14_197 + [122]

    def files(topk, embeddings=False):
        a = {"schema_version": cache_schemas.CURRENT_VERSION, "num_views": 16, "num_samples": n, "classnames": ["c"] * 21_841,
             "topk": topk, "store_embeddings": embeddings, "embed_dim": 1024, "shard_counts": counts, "chunk_len": 1000,
             "key_bytes": 24}
        a["shard_group"] = shard_group(counts, 1000, row_bytes(a))
        return a["shard_group"], store_files(a)

    assert files(None) == (1, 511_137) and files(10) == (26, 28_454)
    assert files(None, embeddings=True) == (1, 738_306) and files(10, embeddings=True) == (1, 965_475)
    text = README.read_text()
    assert all(f in text for f in ("511,137", "28,454", "738,306", "965,475"))
