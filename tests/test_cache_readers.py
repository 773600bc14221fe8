"""The teacher cache in other readers: xarray, tensorstore (zarr3 driver) and plain zarr-python open a
cache written by `dho.precompute.precompute` and read the same values as `TeacherCache`; the
schema-v2 fixture stays readable by dho.

Schema v3 exists for these readers: every array names its dimensions (xarray needs them) and `keys`
is a (N, W) uint8 matrix of zero-padded UTF-8, because v2's variable-length `string` data type is a
zarr-python extension that tensorstore refuses to open. xarray and tensorstore are test extras:
without them their tests are skipped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from fixtures_models import tiny_clip_config, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder

import cache_schemas
from dho import data
from dho.cache import TeacherCache, decode_keys, encode_keys
from dho.cache_info import summarize
from dho.errors import CacheError
from dho.precompute import precompute

V1_ASSET = Path(__file__).parent / "assets" / "v1-cache"
V2_ASSET = Path(__file__).parent / "assets" / "v2-cache"
V3_ASSET = Path(__file__).parent / "assets" / "v3-cache"
# file renames that give keys of several UTF-8 widths (2-byte characters included)
RENAMES = {"class_0/img_000.jpg": "class_0/čaj_ünï.jpg", "class_1/img_002.jpg": "class_1/a_much_longer_file_name.jpg"}
DIMS = {name: tuple(spec["dims"]) for name, spec in cache_schemas.load_schema(4)["x-dho-arrays"].items()}


@pytest.fixture(scope="module")
def odd_keys_ds(tmp_path_factory):
    """8 samples of 2 classes in shards of 3, 3, 2, whose keys are 15 to 31 UTF-8 bytes long."""
    root = tmp_path_factory.mktemp("readers")
    src = make_image_folder(root / "images", num_classes=2, per_class=4)
    for old, new in RENAMES.items():
        (src / old).rename(src / new)
    return data.prepare(src, root / "dataset", shard_size=3)


@pytest.fixture(scope="module")
def caches(odd_keys_ds, tiny_clip_config, tiny_teacher_ckpt):  # noqa: F811
    """{"dense": path, "topk": path}: complete caches of the tiny teacher (2 views + center, embeddings stored)."""
    kw = dict(model=str(tiny_clip_config), pretrained=str(tiny_teacher_ckpt), views=2, center_view=True, seed=1,
              workers=0, device="cpu", store_embeddings=True, progress_every_s=1e9)
    root = odd_keys_ds.root.parent
    precompute(odd_keys_ds.root, root / "dense.zarr", **kw)
    precompute(odd_keys_ds.root, root / "topk.zarr", topk=1, **kw)
    return {"dense": root / "dense.zarr", "topk": root / "topk.zarr"}


def _tensorstore_read(path: Path):
    ts = pytest.importorskip("tensorstore")
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, read=True).result()
    return store, np.asarray(store.read().result())


def test_keys_are_zero_padded_utf8_and_round_trip():
    keys = ["a", "čaj_ünï", "", "x/y z"]
    raw = encode_keys(keys)  # (4, 10): "čaj_ünï" is 10 UTF-8 bytes
    assert raw.dtype == np.uint8 and raw.shape == (4, 10)
    assert raw[0].tolist() == [97] + [0] * 9 and raw[2].tolist() == [0] * 10
    assert decode_keys(raw) == keys
    assert encode_keys([""]).shape == (1, 1)  # W is at least 1
    with pytest.raises(CacheError, match="contains a NUL character"):
        encode_keys(["ok", "bad\0key"])


def test_plain_zarr_reads_a_new_cache_with_named_core_typed_arrays(caches, odd_keys_ds):
    ds = odd_keys_ds
    assert any(not k.isascii() for k in ds.keys)
    for kind, path in caches.items():
        g = zarr.open_group(str(path), mode="r")
        assert g.attrs["schema_version"] == cache_schemas.CURRENT_VERSION and g.attrs["key_bytes"] == max(len(k.encode()) for k in ds.keys) == 31
        for name in g.array_keys():
            meta = g[name].metadata
            assert meta.dimension_names == DIMS[name], name
            assert isinstance(meta.data_type.to_json(zarr_format=3), str), name  # a core type, no configured extension
            codecs = [c.to_dict() for c in meta.codecs]
            if g[name].ndim == 3:  # v4: the per-view arrays in Zarr shards, inner chunks and index checksummed
                assert [c["name"] for c in codecs] == ["sharding_indexed"], name
                inner = codecs[0]["configuration"]
                codecs, index = inner["codecs"], [c["name"] for c in inner["index_codecs"]]
                assert index == ["bytes", "crc32c"] and g[name].shards[1] == 9 and g[name].chunks[1] == 3, name
            assert [c["name"] for c in codecs] == ["bytes", "zstd", "crc32c"], name
        keys = g["keys"][:]  # (N, W) uint8
        assert keys.shape == (8, 31) and [bytes(k).rstrip(b"\0").decode() for k in keys] == ds.keys
        cache = TeacherCache.open(path, dataset=ds)
        assert cache.keys == ds.keys and cache.is_complete() and cache.verify() == []
        assert summarize(path)["schema_version"] == cache_schemas.CURRENT_VERSION


def test_xarray_opens_a_new_cache_with_named_dimensions(caches, odd_keys_ds):
    xr = pytest.importorskip("xarray")
    ds = odd_keys_ds
    cache = TeacherCache.open(caches["dense"], dataset=ds)
    x = xr.open_zarr(caches["dense"], consolidated=False)
    assert dict(x.sizes) == {"view": 3, "sample": 8, "class": 2, "param": 5, "embed": 32, "key_byte": 31, "shard": 3}
    assert {name: x[name].dims for name in x.data_vars} == {n: d for n, d in DIMS.items() if not n.startswith("topk")}
    # values as stored, nothing masked: float16 probs equal what dho reads, -1/0/False fills stay numbers
    for v in range(cache.num_views):
        np.testing.assert_array_equal(x["probs"].isel(view=v).values.astype(np.float32), cache.probs(v, 0, cache.num_samples))
        np.testing.assert_array_equal(x["view_params"].isel(view=v).values, cache.view_params(v, 0, cache.num_samples))
    assert x["probs"].dtype == np.float16 and x["labels"].dtype == np.int64 and x["valid"].dtype == bool
    assert x["labels"].values.tolist() == cache.labels.tolist() and x["valid"].values.all()
    assert x["done"].values.tolist() == [[1] * 3] * 3
    assert [bytes(k).rstrip(b"\0").decode() for k in x["keys"].values] == cache.keys == ds.keys
    np.testing.assert_array_equal(x["text_classifier"].values, cache.text_classifier)
    # the group attributes are plain JSON: nested objects and null come through
    assert x.attrs == json.loads((caches["dense"] / "zarr.json").read_text())["attributes"]
    assert x.attrs["topk"] is None and x.attrs["teacher"]["model"] == "tiny-clip"

    # the top-k cache through open_dataset: its own "topk" dimension
    k = xr.open_dataset(caches["topk"], engine="zarr", consolidated=False)
    assert k["topk_indices"].dims == k["topk_probs"].dims == ("view", "sample", "topk") and k.sizes["topk"] == 1
    top = cache.probs(2, 0, 8).argmax(axis=1)  # the dense cache's top class of the center view
    assert k["topk_indices"].isel(view=2, topk=0).values.tolist() == top.tolist()


def test_open_xarray_names_classes_and_samples(caches, odd_keys_ds):
    """dho.cache.open_xarray: class names on `class`, decoded keys (UTF-8 of several widths) on `sample`, so rows are
    picked by key and columns by class name; the arrays are those of xr.open_zarr."""
    pytest.importorskip("xarray")
    from dho.cache import open_xarray

    ds = odd_keys_ds
    cache = TeacherCache.open(caches["dense"], dataset=ds)
    x = open_xarray(caches["dense"])
    assert x["class"].values.tolist() == ds.classnames and x["sample"].values.tolist() == ds.keys
    assert x.indexes["sample"].is_unique
    key = "class_0/čaj_ünï"
    row = ds.keys.index(key)
    picked = x["probs"].sel(view=1, sample=key, **{"class": ds.classnames[1]})
    assert float(picked) == float(cache.probs(1, 0, cache.num_samples)[row, 1])
    assert x["labels"].sel(sample=key).item() == cache.labels[row]
    assert x["text_classifier"].dims == ("class", "embed") and x["text_classifier"]["class"].values.tolist() == ds.classnames
    np.testing.assert_array_equal(x["probs"].values, zarr.open_group(str(caches["dense"]), mode="r")["probs"][:])
    k = open_xarray(caches["topk"])  # top-k: its indices are class numbers, the coordinates still name samples
    assert k["topk_indices"].dims == ("view", "sample", "topk") and k["sample"].values.tolist() == ds.keys
    with pytest.raises(CacheError, match="no dimension names for xarray"):
        open_xarray(V2_ASSET / "cache.zarr")


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_tensorstore_reads_every_array_as_zarr_python_does(caches, kind):
    g = zarr.open_group(str(caches[kind]), mode="r")
    names = sorted(g.array_keys())
    dropped = {"topk_indices", "topk_probs"} if kind == "dense" else {"probs"}
    assert names == sorted(set(DIMS) - dropped)  # every array of the schema, keys included
    for name in names:
        store, values = _tensorstore_read(caches[kind] / name)
        expected = g[name][:]
        assert store.domain.labels == DIMS[name], name
        assert values.dtype == expected.dtype and values.shape == expected.shape, name
        np.testing.assert_array_equal(values, expected, err_msg=name)  # NaN == NaN here
    _, keys = _tensorstore_read(caches[kind] / "keys")
    assert decode_keys(keys) == TeacherCache.open(caches[kind]).keys


def test_v3_dimension_names_are_checked_on_open(caches, tmp_path):
    copy = tmp_path / "c.zarr"
    shutil.copytree(caches["dense"], copy)
    meta_file = copy / "probs" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["dimension_names"] = ["view", "sample", "klass"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"array 'probs' has dimension names .*'klass'.*, but schema v7 requires "
                                         r"\('view', 'sample', 'class'\); rebuild"):
        TeacherCache.open(copy)
    del meta["dimension_names"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"array 'probs' has dimension names None"):
        TeacherCache.open(copy)


@pytest.mark.parametrize("asset", [V1_ASSET, V2_ASSET], ids=["v1", "v2"])
def test_older_caches_keep_their_string_keys_and_stay_readable_and_resumable(asset, tmp_path):
    """tests/assets/v{1,2}-cache: vlen-string keys, no dimension names; dho reads, verifies and resumes them unchanged."""
    shutil.copytree(asset, tmp_path / "old")
    ds = data.Dataset.open(tmp_path / "old" / "dataset")
    path = tmp_path / "old" / "cache.zarr"
    version = int(asset.name[1])
    g = zarr.open_group(str(path), mode="r")
    assert g["keys"].metadata.data_type.to_json(zarr_format=3) == "string" and g["probs"].metadata.dimension_names is None
    cache = TeacherCache.open(path, dataset=ds)
    assert cache.attrs["schema_version"] == version and cache.is_complete() and "key_bytes" not in cache.attrs
    assert cache.keys == ds.keys == [str(k) for k in g["keys"][:]]
    for view in range(cache.num_views):
        np.testing.assert_allclose(cache.probs(view, 0, cache.num_samples).sum(axis=1), 1.0, atol=2e-3)
    assert cache.verify() == [] and summarize(path)["schema_version"] == version
    # resuming with the fixture's command finds it complete, writes nothing and keeps its version
    before = {f: f.read_bytes() for f in path.rglob("*") if f.is_file()}
    precompute(ds.root, path, model=str(Path(__file__).parent / "assets" / "tiny-clip.json"), pretrained="none",
               templates="simple", views=2, center_view=True, device="cpu", workers=0, progress_every_s=1e9)
    assert {f: f.read_bytes() for f in path.rglob("*") if f.is_file()} == before


def test_a_schema_v3_cache_and_v1_manifest_stay_readable_and_resumable(tmp_path):
    """tests/assets/v3-cache (unsharded chunks, a v1 dataset manifest): read, verified, streamed and resumed
    unchanged by the current dho; a new cache of that dataset is of the current version with the same dataset fingerprint."""
    from dho.stream import PairedStream, Part, PartData

    shutil.copytree(V3_ASSET, tmp_path / "old")
    ds = data.Dataset.open(tmp_path / "old" / "dataset")
    path = tmp_path / "old" / "cache.zarr"
    assert ds.version == 1
    cache = TeacherCache.open(path, dataset=ds)
    assert cache.attrs["schema_version"] == 3 and cache.shard_group == 1 and cache.is_complete()
    assert cache.keys == ds.keys and cache.verify() == [] and summarize(path)["schema_version"] == 3
    stream = PairedStream([], [PartData.open(Part(ds.root, path))], micro_l=0, micro_u=3, seed=0, rank=0, world_size=1, num_workers=0,
                          start_item=0, view_sampling="random", image_size=8, interpolation="bilinear", eta=2.0)
    batch = next(iter(stream)).u
    assert batch.probs.shape == (3, 2) and np.allclose(batch.probs.sum(1).numpy(), 1, atol=2e-3)
    kw = dict(model=str(Path(__file__).parent / "assets" / "tiny-clip.json"), pretrained="none", templates="simple",
              views=2, center_view=True, device="cpu", workers=0, progress_every_s=1e9)
    before = {f: f.read_bytes() for f in path.rglob("*") if f.is_file()}
    precompute(ds.root, path, **kw)
    assert {f: f.read_bytes() for f in path.rglob("*") if f.is_file()} == before
    precompute(ds.root, tmp_path / "new.zarr", **kw)
    new = TeacherCache.open(tmp_path / "new.zarr", dataset=ds)
    assert new.attrs["schema_version"] == cache_schemas.CURRENT_VERSION and new.attrs["dataset_fingerprint"] == cache.attrs["dataset_fingerprint"]
    # same teacher, same views in the new layout; the prompts of its names class_0, class_1 now read "class 0" (v5)
    assert cache.prompt_names == "as-given" and new.prompt_names == new.attrs["teacher"]["prompt_names"] == "underscores-to-spaces"
    for view in range(cache.num_views):
        np.testing.assert_array_equal(new.view_params(view, 0, 6), cache.view_params(view, 0, 6))
    old_w, new_w = cache.array("text_classifier")[:], new.array("text_classifier")[:]  # (C, D)
    assert old_w.shape == new_w.shape and np.abs(old_w - new_w).max() > 1e-3


def _as_v4(cache_path: Path) -> None:
    """Turn a current cache into what dho wrote as schema v4: the same, without teacher.prompt_names."""
    g = zarr.open_group(str(cache_path), mode="r+")
    g.attrs.update({"schema_version": 4, "teacher": {k: v for k, v in g.attrs["teacher"].items() if k != "prompt_names"}})


def test_a_v4_cache_with_underscored_class_names_is_never_extended_with_v5_prompts(caches, odd_keys_ds, tiny_clip_config,
                                                                                   tiny_teacher_ckpt, tmp_path, capsys):  # noqa: F811
    """v1-v4 prompted "class_0" as given, v5 prompts "class 0": a complete old store is left as it is (a note
    says so), an incomplete one is refused instead of being finished with other prompts."""
    kw = dict(model=str(tiny_clip_config), pretrained=str(tiny_teacher_ckpt), views=2, center_view=True, seed=1,
              workers=0, device="cpu", store_embeddings=True, progress_every_s=1e9)
    assert any("_" in c for c in odd_keys_ds.classnames)
    old = tmp_path / "old.zarr"
    shutil.copytree(caches["dense"], old)
    _as_v4(old)
    cache = TeacherCache.open(old, dataset=odd_keys_ds)
    assert cache.attrs["schema_version"] == 4 and cache.prompt_names == "as-given" and summarize(old)["prompt_names"] == "as-given"
    before = {f: f.read_bytes() for f in old.rglob("*") if f.is_file()}
    precompute(odd_keys_ds.root, old, **kw)
    assert {f: f.read_bytes() for f in old.rglob("*") if f.is_file()} == before
    assert "older dho that put the class names with '_' into the prompts as given" in capsys.readouterr().err
    g = zarr.open_group(str(old), mode="r+")
    g.attrs.update({"complete": False})
    g["done"][0, 0] = 0  # a unit left to compute
    with pytest.raises(CacheError, match="teacher.prompt_names: \"as-given\" in the cache vs \"underscores-to-spaces\" now"):
        precompute(odd_keys_ds.root, old, **kw)
    assert zarr.open_group(str(old), mode="r")["done"][0, 0] == 0  # nothing written


def test_readme_documents_the_dimension_names():
    readme = (Path(cache_schemas.__file__).parent / "README.md").read_text()
    table = readme.split("## Arrays", 1)[1].split("## Attributes", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `") and not line.startswith("| `-")]
    assert {r[0].strip("| `"): r[3] for r in rows} == {n: "(" + ", ".join(d) + ")" for n, d in DIMS.items()}
