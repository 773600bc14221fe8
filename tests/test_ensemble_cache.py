"""Teacher ensembles in one cache (`dho merge-caches`, schema v6) with two tiny open_clip teachers of different seeds:
the members are their source caches, the mean is theirs, distill trains on the mean or on one teacher (that one bit for
bit as on the teacher's own cache), mismatches are refused in one line, and plain zarr opens the store."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import cache_schemas
from typer.testing import CliRunner

from dho import data
from dho.cache import TeacherCache
from dho.cli import app
from dho.distill import DistillConfig, distill
from dho.ensemble import merge_caches
from dho.errors import CacheError, ConfigError
from dho.precompute import precompute
from dho.students import load_student
from fixtures_models import TINY_CLIP_CONFIG, _tiny_state_dict
from helpers_data import make_image_folder

VIEWS = 2


@pytest.fixture(scope="module")
def ens(tmp_path_factory):
    """A 4-class dataset (24 images) and its 2-shot labeled split, cached by teachers A (seed 1) and B (seed 2) with
    embeddings, and the two ensembles (the full one merged through the CLI). Read-only."""
    root = tmp_path_factory.mktemp("ensemble")
    src = make_image_folder(root / "images", num_classes=4, per_class=6)
    full = data.prepare(src, root / "full", shard_size=8)
    labeled, _ = data.split(full, root / "labeled", shots=2, seed=0, shard_size=4)
    for name, seed in (("A", 1), ("B", 2)):
        ckpt = root / f"teacher-{name}.pt"
        torch.save(_tiny_state_dict(seed=seed), ckpt)
        kw = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(ckpt), views=VIEWS, device="cpu", workers=0, batch_size=16,
                  store_embeddings=True)
        precompute(full.root, root / f"full-{name}.zarr", **kw)
        precompute(labeled.root, root / f"labeled-{name}.zarr", **kw)
    r = CliRunner().invoke(app, ["merge-caches", str(root / "full-A.zarr"), str(root / "full-B.zarr"), "--out",
                                 str(root / "full-ens.zarr"), "--names", "A,B"])
    assert r.exit_code == 0, r.output
    merge_caches([root / "labeled-A.zarr", root / "labeled-B.zarr"], root / "labeled-ens.zarr", names=["A", "B"])
    return root


def _raw(path: Path, name: str) -> np.ndarray:
    """An array read with plain zarr, no dho."""
    return np.asarray(zarr.open_group(str(path), mode="r")[name][:])


def test_members_are_their_source_caches_and_the_mean_is_theirs(ens):
    cache = TeacherCache.open(ens / "full-ens.zarr", dataset=data.Dataset.open(ens / "full"))
    assert cache.attrs["schema_version"] == cache_schemas.CURRENT_VERSION and cache.is_complete() and cache.teacher_names == ["A", "B"]
    assert cache.verify() == []
    a, b = (ens / f"full-{n}.zarr" for n in "AB")
    pa, pb = _raw(a, "probs").astype(np.float64), _raw(b, "probs").astype(np.float64)  # (V, N, C)
    for i, src in enumerate((a, b)):  # bit for bit: probabilities, embeddings, text classifier
        for name in ("probs", "embeddings", "text_classifier"):
            assert np.array_equal(_raw(ens / "full-ens.zarr", f"teachers/{i}/{name}"), _raw(src, name)), name
        assert cache.members[i]["teacher"] == TeacherCache.open(src).attrs["teacher"]
    assert np.array_equal(_raw(ens / "full-ens.zarr", "view_params"), _raw(a, "view_params"))
    assert not np.allclose(pa, pb, atol=1e-3)  # two different teachers
    n = cache.num_samples
    for v in range(cache.num_views):
        # the stored mean: (p_A + p_B) / 2 at the caches' eta, to float16 rounding
        np.testing.assert_allclose(cache.select("mean").probs(v, 0, n), (pa[v] + pb[v]) / 2, atol=1e-3, rtol=0)
        # at another eta each member is re-tempered exactly, and the mean is the mean of the re-tempered members
        power = cache.eta / 1.0
        ra, rb = (p[v] ** power / (p[v] ** power).sum(1, keepdims=True) for p in (pa, pb))
        np.testing.assert_allclose(cache.probs(v, 0, n, eta=1.0), (ra + rb) / 2, atol=1e-5, rtol=0)
        own = TeacherCache.open(b).probs(v, 0, n, eta=1.0)
        assert np.array_equal(cache.select("B").probs(v, 0, n, eta=1.0), own)
        assert np.array_equal(cache.select(0).embeddings(v, 0, n), TeacherCache.open(a).embeddings(v, 0, n))
    assert np.array_equal(cache.select(1).text_classifier, TeacherCache.open(b).text_classifier)
    with pytest.raises(CacheError, match="their mean has no text classifier"):
        _ = cache.select("mean").text_classifier
    with pytest.raises(CacheError, match="choose mean, 0 or A, 1 or B"):
        cache.select("C")


def test_plain_zarr_opens_the_merged_store_and_cache_info_shows_the_teachers(ens):
    g = zarr.open_group(str(ens / "full-ens.zarr"), mode="r")
    assert [m["name"] for m in g.attrs["teachers"]] == ["A", "B"] and g.attrs["teacher"]["model"] == "ensemble(A+B)"
    assert g["probs"].shape == g["teachers/0/probs"].shape == g["teachers/1/probs"].shape == (VIEWS, 24, 4)
    assert "text_classifier" not in g.array_keys() and g["teachers"].attrs["names"] == ["A", "B"]
    r = CliRunner().invoke(app, ["cache-info", str(ens / "full-ens.zarr"), "--verify"])
    assert r.exit_code == 0, r.output
    assert "teachers:   2, their mean in probs (arithmetic, at eta=2.0)" in r.output
    assert "  [0] A: " in r.output and "  [1] B: " in r.output and "read back intact" in r.output
    info = json.loads(CliRunner().invoke(app, ["cache-info", str(ens / "full-ens.zarr"), "--json"]).output)
    assert [m["name"] for m in info["teachers"]] == ["A", "B"] and all(0 <= m["agreement"] <= 1 for m in info["teachers"])
    single = json.loads(CliRunner().invoke(app, ["cache-info", str(ens / "full-A.zarr"), "--json"]).output)
    assert single["teachers"] == [] and single["agreement"] == info["teachers"][0]["agreement"]


def _cfg(ens: Path, out: Path, kind: str, **kw) -> DistillConfig:
    base = dict(labeled=str(ens / "labeled"), labeled_cache=str(ens / f"labeled-{kind}.zarr"), unlabeled=str(ens / "full"),
                unlabeled_cache=str(ens / f"full-{kind}.zarr"), student="resnet-tiny", out=str(out), method="dho", epochs=1,
                batch_size=8, lr=3e-3, workers=0, device="cpu", log_every=1, seed=0)
    return DistillConfig(**{**base, **kw})


def _weights(run: Path) -> dict:
    return load_student(run / "model.pt")[0].state_dict()


def test_distill_on_one_teacher_equals_its_own_cache_bit_for_bit_and_the_mean_trains(ens, tmp_path):
    distill(_cfg(ens, tmp_path / "own", "B", eta=1.0))
    distill(_cfg(ens, tmp_path / "member", "ens", teacher="B", eta=1.0))  # re-tempered from eta 2, per teacher
    own, member = _weights(tmp_path / "own"), _weights(tmp_path / "member")
    assert all(torch.equal(own[k], member[k]) for k in own)
    assert DistillConfig.load(tmp_path / "member" / "config.json").teacher == "B"
    distill(_cfg(ens, tmp_path / "mean", "ens"))
    mean = _weights(tmp_path / "mean")
    assert not all(torch.equal(own[k], mean[k]) for k in own)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "mean" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 24 // 8 and all(np.isfinite(losses))
    # feature KD reads one teacher's embeddings: with a member it trains, with the mean it is refused
    distill(_cfg(ens, tmp_path / "feat", "ens", teacher="1", method="ce+kd-feature", max_steps=1))
    with pytest.raises(ConfigError, match="the mean of the ensemble A, B has not: choose one with --teacher NAME"):
        distill(_cfg(ens, tmp_path / "feat-mean", "ens", method="ce+kd-feature"))


def test_distill_refuses_mixed_ensembles_and_unknown_teachers(ens, tmp_path):
    with pytest.raises(CacheError, match="--labeled-cache is an ensemble of A, B but --unlabeled-cache is a single-teacher cache"):
        distill(_cfg(ens, tmp_path / "a", "ens", unlabeled_cache=str(ens / "full-A.zarr")))
    with pytest.raises(CacheError, match="--teacher C: .* is an ensemble of 2 teachers; choose mean, 0 or A, 1 or B"):
        distill(_cfg(ens, tmp_path / "b", "ens", teacher="C"))
    with pytest.raises(CacheError, match="--teacher 1: .* is a single-teacher cache; choose mean"):
        distill(_cfg(ens, tmp_path / "c", "A", teacher="1"))
    with pytest.raises(ConfigError, match="--teacher 'a b'"):
        _cfg(ens, tmp_path / "d", "ens", teacher="a b")
    assert not any((tmp_path / x).exists() for x in "abcd")


def _listing(paths) -> dict:
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for p in paths for f in Path(p).rglob("*") if f.is_file()}


def test_merge_refusals_are_one_line_and_leave_the_sources_alone(ens, tmp_path):
    a, b, lab = ens / "full-A.zarr", ens / "full-B.zarr", ens / "labeled-A.zarr"
    before = _listing([a, b, lab])
    renamed = tmp_path / "renamed.zarr"  # the same dataset under another class list
    shutil.copytree(b, renamed)
    g = zarr.open_group(str(renamed), mode="r+")
    g.attrs.update({"classnames": ["x", *g.attrs["classnames"][1:]]})
    otherviews = tmp_path / "views.zarr"
    precompute(ens / "full", otherviews, model=str(TINY_CLIP_CONFIG), pretrained=str(ens / "teacher-B.pt"), views=1,
               device="cpu", workers=0, batch_size=16)
    cases = [
        ([a, lab], "were made on different datasets (24 samples in the cache, 8 in the dataset)"),
        ([a, renamed], "were made on different datasets (another class list (class 0 is 'class_0' in the cache but 'x'"),
        ([a, otherviews], "were made with different numbers of views"),
        ([a, a], "repeat; give distinct ones with --names"),
        ([a], "needs two or more caches"),
        ([a, ens / "full-ens.zarr"], "is already an ensemble"),
    ]
    for sources, message in cases:
        with pytest.raises((CacheError, ConfigError), match=re.escape(message)) as e:
            merge_caches(sources, tmp_path / "out.zarr")
        assert "\n" not in str(e.value) and not (tmp_path / "out.zarr").exists()
    with pytest.raises(CacheError, match="the same teacher with the same settings"):
        merge_caches([a, a], tmp_path / "out.zarr", names=["x", "y"])
    with pytest.raises(ConfigError, match="is not empty|exists"):
        merge_caches([a, b], ens / "full-ens.zarr")
    with pytest.raises(ConfigError, match="is the source"):
        merge_caches([a, b], a)
    r = subprocess.run([sys.executable, "-m", "dho", "merge-caches", str(a), str(lab), "--out", str(tmp_path / "cli.zarr")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error: " in r.stderr and "different datasets" in r.stderr
    assert not (tmp_path / "cli.zarr").exists()
    assert _listing([a, b, lab]) == before


def test_a_failed_merge_leaves_no_cache_and_a_killed_ones_leftover_is_removed(ens, tmp_path, monkeypatch):
    out = tmp_path / "ens.zarr"
    calls = []
    real = TeacherCache.write_unit

    def failing(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk went away")  # a failure mid-merge
        return real(self, *args, **kw)

    monkeypatch.setattr(TeacherCache, "write_unit", failing)
    with pytest.raises(OSError, match="disk went away"):
        merge_caches([ens / "full-A.zarr", ens / "full-B.zarr"], out)
    assert list(tmp_path.iterdir()) == []  # nothing that looks like a cache, no temporary left
    monkeypatch.setattr(TeacherCache, "write_unit", real)
    dead = tmp_path / ".ens.zarr.creating-4194000-0123abcd"  # what a SIGKILLed merge leaves: pid 4194000 is gone
    (dead / "probs").mkdir(parents=True)
    assert not os.path.exists("/proc/4194000")
    merge_caches([ens / "full-A.zarr", ens / "full-B.zarr"], out, names=["A", "B"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens.zarr"]
    assert np.array_equal(_raw(out, "probs"), _raw(ens / "full-ens.zarr", "probs"))


def test_readme_member_table_is_the_schemas():
    import cache_schemas

    readme = (Path(cache_schemas.__file__).parent / "README.md").read_text()
    rows = dict(re.findall(r"\| `teachers/<i>/(\w+)` \| [^|]+ \| (\w+) \|", readme))
    table = cache_schemas.load_schema(6)["x-dho-member-arrays"]
    assert rows == {name: spec["dtype"] for name, spec in table.items()}
