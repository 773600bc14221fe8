"""Replayable strong augmentation in the teacher cache (`--augment randaugment:N,M`, `--erase P`, schema v7): the
programs are a pure function of (seed, key, view), the student's replay equals the teacher's image pixel for pixel at
one resolution, caches without it (v6) replay as before, and distill on an augmented cache runs and resumes bit-identically."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import cache_schemas
from dho import data
from dho.cache import TeacherCache
from dho.data.augment import OPS, apply_program, augment_program, augment_view, parse_augment
from dho.distill import distill
from dho.errors import ConfigError
from dho.precompute import _ShardBatches, precompute
from dho.stream import PairedStream, PartData, Part
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder
from test_distill import _cfg, _state

AUG = {"randaugment": {"num_ops": 2, "magnitude": 9}, "erase": 0.5}


@pytest.fixture(scope="module")
def aug_world(tmp_path_factory, tiny_teacher_ckpt):  # noqa: F811
    """A 4-class dataset, its 2-shot labeled split, both cached with RandAugment 2,9 + erasing 0.5, and one plain cache."""
    root = tmp_path_factory.mktemp("strongaug")
    src = make_image_folder(root / "images", num_classes=4, per_class=10)
    full = data.prepare(src, root / "full", shard_size=8)
    data.split(full, root / "labeled", shots=2, seed=0, val_per_class=2, val_out=root / "val", shard_size=4)
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cpu", workers=0, batch_size=16)
    precompute(root / "full", root / "full.zarr", augment="randaugment:2,9", erase=0.5, **teacher)
    precompute(root / "labeled", root / "labeled.zarr", augment="randaugment:2,9", erase=0.5, **teacher)
    precompute(root / "labeled", root / "plain.zarr", **teacher)
    return root


def test_parse_augment_and_one_line_errors():
    assert parse_augment("randaugment:2,9", 0.25) == {"randaugment": {"num_ops": 2, "magnitude": 9}, "erase": 0.25}
    assert parse_augment(None, None) is None and parse_augment("none", 0.0) is None
    assert parse_augment(None, 1.0) == {"randaugment": None, "erase": 1.0}
    for spec, erase, msg in (("autoaugment", None, "unknown augmentation"), ("randaugment:2", None, "integers N"),
                             ("randaugment:a,b", None, "integers N"), ("randaugment:0,9", None, "1-16"),
                             ("randaugment:2,31", None, "0-30"), (None, 1.5, r"\[0, 1\]"), (None, float("nan"), r"\[0, 1\]")):
        with pytest.raises(ConfigError, match=msg) as e:
            parse_augment(spec, erase)
        assert "\n" not in str(e.value)


def test_programs_are_a_pure_function_of_seed_key_view():
    a = augment_program(AUG, 0, "k/1", 3)
    assert a == augment_program(AUG, 0, "k/1", 3)  # same inputs, same program (no global RNG involved)
    torch.manual_seed(123)
    np.random.seed(5)
    assert a == augment_program(AUG, 0, "k/1", 3)
    progs = [augment_program(AUG, s, k, v) for s in (0, 1) for k in ("k/1", "k/2") for v in (0, 1, 2)]
    assert len({repr(p) for p in progs}) == len(progs)  # each input changes the program
    names = {n for _, n, _ in [(None, o[0], None) for o in OPS]}
    many = [augment_program(AUG, 0, f"k/{i}", 0) for i in range(200)]
    assert all(len(p["ops"]) == 2 and {n for n, _ in p["ops"]} <= names for p in many)
    erased = sum(p["erase"] is not None for p in many)
    assert 70 < erased < 130  # p = 0.5
    for p in many:  # the box is resolution-free: fractions inside the image
        if p["erase"] is not None:
            t, l_, h, w = p["erase"]
            assert 0 <= t and 0 <= l_ and t + h <= 1 + 1e-9 and l_ + w <= 1 + 1e-9


def test_ops_change_pixels_and_erase_writes_zeros():
    img = (torch.arange(3 * 16 * 16) % 251).to(torch.uint8).view(3, 16, 16)
    out = apply_program(img, {"ops": [], "erase": (0.25, 0.5, 0.5, 0.25)})
    assert out[:, 4:12, 8:12].eq(0).all() and torch.equal(out[:, :4], img[:, :4]) and torch.equal(out[:, :, :8], img[:, :, :8])
    for name, top, signed in OPS:
        if name not in ("Identity", "AutoContrast", "Equalize"):
            y = apply_program(img, {"ops": [(name, top / 2 if name != "Posterize" else 4.0)], "erase": None})
            assert y.dtype == torch.uint8 and y.shape == img.shape and not torch.equal(y, img), name
    assert torch.equal(augment_view(img, None, 0, "k", 0), img)


def test_cache_records_v7_attribute_and_plain_cache_has_none(aug_world):
    c = TeacherCache.open(aug_world / "labeled.zarr")
    assert c.attrs["schema_version"] == cache_schemas.CURRENT_VERSION == 7 and c.augment == AUG
    assert TeacherCache.open(aug_world / "plain.zarr").augment is None


def _student_images(root, cache: str, size: int, interpolation: str):
    """The first micro-batch the distill stream yields from (labeled, cache) at `size`: (uint8 images, global rows)."""
    ds = data.Dataset.open(root / "labeled")
    tc = TeacherCache.open(root / cache, dataset=ds)
    part = PartData.of(Part(root / "labeled", root / cache), ds, tc)
    stream = PairedStream([part], [], micro_l=6, micro_u=6, seed=0, rank=0, world_size=1, num_workers=1, start_item=0,
                          view_sampling="cycle", image_size=size, interpolation=interpolation, eta=2.0,
                          need_embeddings=False, window=2, raw=False)
    batch = next(iter(stream)).l
    return batch.image, batch.index.tolist(), ds, tc


@pytest.mark.parametrize("cache", ["labeled.zarr", "plain.zarr"])
def test_student_replay_equals_teacher_image_bit_for_bit(aug_world, cache):
    """At the teacher's resolution the student's view (pass 0 = view 0) is the teacher's input, pixel for pixel: the
    precompute worker's normalised image is the student's uint8 normalised with the teacher's mean/std."""
    tc = TeacherCache.open(aug_world / cache)
    pp = data.Preprocessing.from_dict(tc.attrs["preprocess"])
    images, rows, ds, tc = _student_images(aug_world, cache, pp.image_size, pp.interpolation)
    samples = {s.index: s for s in data.OrderedReader(ds, rank=0, world_size=1, decode=False)}
    teacher = _ShardBatches(ds, [], 2, False, int(tc.attrs["seed"]), pp, 1, tc.augment)
    plain = _ShardBatches(ds, [], 2, False, int(tc.attrs["seed"]), pp, 1, None)
    for img, row in zip(images, rows):
        t = teacher._batch([samples[row]])["images"][0]  # view 0, normalised, as the teacher ran it
        assert torch.equal(data.normalize(img, pp.mean, pp.std), t)
        p = plain._batch([samples[row]])["images"][0]
        assert torch.equal(t, p) == (tc.augment is None)  # v6 path: crop + flip only, unchanged


def test_v6_cache_reads_and_replays_as_before(aug_world, tmp_path):
    """A plain cache relabelled v6 (the layout v7 keeps) opens and replays exactly as the v7 plain cache."""
    import shutil

    import zarr

    old = tmp_path / "v6.zarr"
    shutil.copytree(aug_world / "plain.zarr", old)
    zarr.open_group(str(old), mode="r+").attrs.update({"schema_version": 6})
    c = TeacherCache.open(old)
    assert c.attrs["schema_version"] == 6 and c.augment is None and c.verify() == []
    a = _student_images(aug_world, "plain.zarr", 24, "bicubic")[0]
    shutil.copytree(old, aug_world / "v6-copy.zarr", dirs_exist_ok=True)
    b = _student_images(aug_world, "v6-copy.zarr", 24, "bicubic")[0]
    assert torch.equal(a, b)


def test_precompute_refuses_to_mix_augmentations(aug_world, tiny_teacher_ckpt):  # noqa: F811
    from dho.errors import CacheError

    with pytest.raises(CacheError, match="augment"):
        precompute(aug_world / "labeled", aug_world / "labeled.zarr", model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt),
                   views=2, device="cpu", workers=0, batch_size=16, augment="randaugment:2,5", erase=0.5)


def test_distill_on_augmented_cache_runs_and_resumes_bit_identically(aug_world, tmp_path):
    kw = dict(epochs=1)
    full = tmp_path / "full"
    distill(_cfg(aug_world, full, **kw))
    split = tmp_path / "split"
    distill(_cfg(aug_world, split, max_steps=2, **kw))
    distill(_cfg(aug_world, split, **kw), resume=True)
    a, b = _state(full), _state(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ConfigError, match="--decode cpu"):
        distill(_cfg(aug_world, tmp_path / "gpu", decode="gpu", **kw))


def test_cli_refuses_a_bad_spec_in_one_line_before_loading_the_teacher(tiny_dataset, tmp_path):
    import subprocess
    import sys

    for args, msg in ((["--augment", "randaugment:2"], "--augment 'randaugment:2': write randaugment:N,M"),
                      (["--erase", "2"], "--erase 2.0: the erasing probability must be in [0, 1]")):
        proc = subprocess.run([sys.executable, "-m", "dho.cli", "precompute-teacher", str(tiny_dataset.root), "--out",
                               str(tmp_path / "c.zarr"), *args], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and msg in proc.stderr, proc.stderr
        assert not (tmp_path / "c.zarr").exists()


def test_job_array_ranks_compute_the_same_augmented_cache(aug_world, tmp_path, tiny_teacher_ckpt):  # noqa: F811
    """Two job-array ranks (one shard group each) write the numbers one process wrote: the programs depend on
    (seed, key, view) only, never on the rank."""
    out = tmp_path / "ranks.zarr"
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cpu", workers=0, batch_size=16)
    for rank in (0, 1):
        precompute(aug_world / "labeled", out, augment="randaugment:2,9", erase=0.5, rank=rank, world_size=2, shard_group=1, **teacher)
    a, b = TeacherCache.open(aug_world / "labeled.zarr"), TeacherCache.open(out)
    assert b.is_complete() and b.augment == a.augment
    for v in range(2):
        assert np.array_equal(a.probs(v, 0, a.num_samples), b.probs(v, 0, b.num_samples))
        assert np.array_equal(a.view_params(v, 0, a.num_samples), b.view_params(v, 0, b.num_samples))
