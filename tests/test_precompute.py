"""Stage 1 end to end on CPU with a tiny open_clip teacher: values, resume after SIGKILL, torchrun,
job arrays, top-k, corrupt images, mismatches, cache-info."""

from __future__ import annotations

import inspect

import cache_schemas
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
import zarr
from fixtures_models import TINY_CLIP_NAME, tiny_clip_config, tiny_teacher_ckpt  # noqa: F401
from PIL import Image
from test_cache import _readme_tables
from typer.testing import CliRunner

from dho import data
from dho.cache import TeacherCache
from dho.cli import app
from dho.errors import CacheError, DatasetError
from dho.precompute import precompute

VENV_BIN = Path(sys.executable).parent
VIEWS, SEED, ETA, ZETA = 2, 3, 2.0, 0.01  # + the center view: 3 views x 5 shards = 15 units
TIP_ADAPTER = [
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
]


def _args(ds, out, config, ckpt, workers=2) -> list[str]:
    return [
        str(ds.root), "--out", str(out), "--model", str(config), "--pretrained", str(ckpt), "--views", str(VIEWS),
        "--center-view", "--seed", str(SEED), "--batch-size", "6", "--workers", str(workers), "--store-embeddings",
        "--device", "cpu",
    ]


def _kwargs(config, ckpt, **over) -> dict:
    kw = dict(model=str(config), pretrained=str(ckpt), views=VIEWS, center_view=True, seed=SEED, batch_size=6,
              workers=0, store_embeddings=True, device="cpu")
    return {**kw, **over}


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def _assert_same_store(a: Path, b: Path) -> None:
    """Every array equal bit for bit (NaN == NaN), every attribute equal except created_at and shard_group
    (the file layout, not the numbers)."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        x, y = ga[name][:], gb[name][:]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype.kind == "f":  # compare the bits: NaN rows included
            x, y = x.view(f"u{x.itemsize}"), y.view(f"u{y.itemsize}")
        assert np.array_equal(x, y), name
    drop = lambda d: {k: v for k, v in d.items() if k not in ("created_at", "shard_group")}  # noqa: E731
    assert drop(dict(ga.attrs)) == drop(dict(gb.attrs))


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory, tiny_dataset, tiny_clip_config, tiny_teacher_ckpt) -> Path:
    """An uninterrupted `dho precompute-teacher` run (subprocess, 2 DataLoader workers); read-only."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    cmd = [str(VENV_BIN / "dho"), "precompute-teacher", *_args(tiny_dataset, out, tiny_clip_config, tiny_teacher_ckpt)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "complete: 15/15 units" in r.stderr and "images/s, ETA" in r.stderr
    return out


def _shard_images(ds) -> dict[str, Image.Image]:
    """Original images by key, read straight from the tar files (not through dho.data)."""
    out = {}
    for shard in ds.shards:
        with tarfile.open(shard.path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    out[m.name[: -len(".jpg")]] = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
    return out


def test_probs_match_an_independent_open_clip_recomputation(ref_cache, tiny_dataset, tiny_teacher_ckpt):
    ds = tiny_dataset
    cache = TeacherCache.open(ref_cache, dataset=ds)
    assert cache.is_complete() and cache.num_views == VIEWS + 1 and cache.valid.all()
    pp = cache.attrs["preprocess"]
    assert (pp["image_size"], pp["interpolation"], pp["resize_mode"]) == (32, "bicubic", "shortest")

    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=str(tiny_teacher_ckpt)).eval()
    tok = open_clip.get_tokenizer(TINY_CLIP_NAME)
    images = _shard_images(ds)
    from open_clip.transform import image_transform

    eval_transform = image_transform(32, is_train=False, mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                                     resize_mode="shortest", interpolation="bicubic")
    with torch.no_grad():
        w = torch.stack([F.normalize(F.normalize(model.encode_text(tok([t.format(c.replace("_", " ")) for t in TIP_ADAPTER])), dim=-1).mean(0), dim=-1)
                         for c in ds.classnames])  # (C, D)
        np.testing.assert_allclose(cache.text_classifier, w.numpy(), atol=1e-6)
        flips = set()
        for v in range(VIEWS + 1):
            params = cache.view_params(v, 0, ds.num_samples)  # (N, 5)
            batch = []
            for key, (top, left, h, wd, flip) in zip(ds.keys, params):
                img = images[key]
                W, H = img.size
                assert 0 <= top and top + h <= H and 0 <= left and left + wd <= W
                if v == VIEWS:  # center view: central square for resize_mode 'shortest'
                    s = min(W, H)
                    assert (h, wd, flip) == (s, s, 0) and abs(top - (H - s) / 2) <= 0.5 and abs(left - (W - s) / 2) <= 0.5
                else:
                    assert 0.45 <= h * wd / (W * H) <= 1.0 and 3 / 4 - 0.1 <= wd / h <= 4 / 3 + 0.1
                    flips.add(int(flip))
                if v == VIEWS:  # open_clip's own eval transform
                    batch.append(eval_transform(img))
                    continue
                x = TF.resize(TF.crop(img, int(top), int(left), int(h), int(wd)), [32, 32], interpolation=TF.InterpolationMode.BICUBIC)
                x = TF.hflip(x) if flip else x
                batch.append(TF.normalize(TF.to_tensor(x), pp["mean"], pp["std"]))
            emb = F.normalize(model.encode_image(torch.stack(batch)), dim=-1)  # (N, D)
            expected = torch.softmax(emb @ w.T / (ZETA * ETA), dim=-1).numpy()  # (N, C)
            got = cache.probs(v, 0, ds.num_samples)
            np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-3)
            np.testing.assert_allclose(cache.embeddings(v, 0, ds.num_samples), emb.numpy(), atol=2e-3)
            # re-tempering at read time equals the teacher at another eta
            np.testing.assert_allclose(cache.probs(v, 0, ds.num_samples, eta=1.0),
                                       torch.softmax(emb @ w.T / ZETA, dim=-1).numpy(), atol=5e-3)
        assert flips == {0, 1}


def test_sigkill_then_rerun_equals_uninterrupted(ref_cache, tiny_dataset, tiny_clip_config, tiny_teacher_ckpt, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [str(VENV_BIN / "dho"), "precompute-teacher", *_args(tiny_dataset, out, tiny_clip_config, tiny_teacher_ckpt)]
    proc = subprocess.Popen(cmd, env=_env(DHO_TEST_SLOW_UNITS="0.4"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done, deadline = 0, time.time() + 90
    try:
        while proc.poll() is None and time.time() < deadline:
            if (out / "zarr.json").exists():
                done = int(zarr.open_group(str(out), mode="r")["done"][:].sum())
                if done >= 4:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and 4 <= done < 15
    killed = TeacherCache.open(out, dataset=tiny_dataset)
    assert not killed.is_complete() and 4 <= killed.done.sum() < 15
    text = CliRunner().invoke(app, ["cache-info", str(out)]).output
    assert re.search(rf"coverage: +{int(killed.done.sum())}/15 units done \(\d+\.\d%\), complete: no", text)
    # rerun the same command: skips done units, finishes the rest
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _assert_same_store(ref_cache, out)
    assert not list(out.rglob("*.partial"))


@pytest.mark.parametrize("sig,target", [("SIGTERM", "process"), ("SIGTERM", "process group"), ("SIGUSR1", "process group")])
def test_sigterm_stops_between_units_exits_3_and_the_rerun_finishes(ref_cache, tiny_dataset, tiny_clip_config,
                                                                  tiny_teacher_ckpt, tmp_path, sig, target):
    """SIGTERM, or SIGUSR1 (SLURM's warning before the kill, sent to every process of a job step: the DataLoader
    workers ignore it), stops between units with exit status 3; the same command computes the rest."""
    out = tmp_path / "stopped.zarr"
    cmd = [str(VENV_BIN / "dho"), "precompute-teacher", *_args(tiny_dataset, out, tiny_clip_config, tiny_teacher_ckpt)]
    proc = subprocess.Popen(cmd, env=_env(DHO_TEST_SLOW_UNITS="0.4"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 90
    while proc.poll() is None and time.time() < deadline:
        if (out / "zarr.json").exists() and int(zarr.open_group(str(out), mode="r")["done"][:].sum()) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, getattr(signal, sig)) if target == "process" else os.killpg(proc.pid, getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: stopped by {sig} with \d+/15 units of {re.escape(str(out))} done; rerun the same command "
                        "to compute the rest", last), last
    assert "Traceback" not in err
    stopped = TeacherCache.open(out, dataset=tiny_dataset)
    assert not stopped.is_complete() and 3 <= stopped.done.sum() < 15
    assert not list(out.rglob("*.partial"))
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _assert_same_store(ref_cache, out)


def test_torchrun_two_ranks_equals_one_process(ref_cache, tiny_dataset, tiny_clip_config, tiny_teacher_ckpt, tmp_path):
    out = tmp_path / "torchrun.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dho.cli",
           "precompute-teacher", *_args(tiny_dataset, out, tiny_clip_config, tiny_teacher_ckpt, workers=0)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rank 1/2]" in r.stderr and "complete: 15/15 units" in r.stderr
    _assert_same_store(ref_cache, out)


def test_job_array_ranks_and_finalisation(ref_cache, tiny_dataset, tiny_clip_config, tiny_teacher_ckpt, tmp_path):
    """Two jobs of an array give the reference store bit for bit. Same command, same settings: the
    worker count sets the teacher's thread count, which may change float rounding. Jobs own whole groups
    of --shard-group shards (they share Zarr shards): groups {0, 1}, {2, 3}, {4} -> job 0 writes 0, 1, 4."""
    out = tmp_path / "array.zarr"
    cmd = [str(VENV_BIN / "dho"), "precompute-teacher", *_args(tiny_dataset, out, tiny_clip_config, tiny_teacher_ckpt)]
    r = subprocess.run(cmd + ["--rank", "0", "--world-size", "2", "--shard-group", "2"], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    half = TeacherCache.open(out)
    assert half.shard_group == 2 and zarr.open_group(str(out), mode="r")["probs"].shards == (1, 10, 3)
    assert half.done.all(axis=0).tolist() == [True, True, False, False, True] and not half.is_complete()
    r = subprocess.run(cmd + ["--rank", "1", "--world-size", "2", "--shard-group", "3"], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "shard_group: 2 in the cache vs 3 now" in r.stderr
    r = subprocess.run(cmd + ["--rank", "1", "--world-size", "2"], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert TeacherCache.open(out).is_complete()  # the last job to finish finalises
    _assert_same_store(ref_cache, out)
    # a job array with more jobs than shard groups: the extra job writes nothing and says why
    r = subprocess.run(cmd + ["--rank", "3", "--world-size", "4"], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "note: this rank has no shard to write: the store's 5 shards form 3 group(s)" in r.stderr


def test_a_dataset_of_pipe_urls_gives_the_cache_of_its_local_files(tiny_dataset, tiny_clip_config, tiny_teacher_ckpt, tmp_path):
    """DataLoader workers read `pipe:` shards through their commands; the numbers are those of the local files."""
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"{c}\n" for c in tiny_dataset.classnames))
    piped = data.index([f"pipe:cat {tiny_dataset.root}/shard-{{000000..000004}}.tar"], names, tmp_path / "piped")
    kw = _kwargs(tiny_clip_config, tiny_teacher_ckpt, views=1, center_view=False, store_embeddings=False, workers=2)
    caches = [precompute(ds, tmp_path / f"{i}.zarr", **kw) for i, ds in enumerate((tiny_dataset.root, piped.root))]
    assert caches[1].is_complete()
    assert np.array_equal(caches[0].probs(0, 0, 24), caches[1].probs(0, 0, 24))
    assert np.array_equal(caches[0].view_params(0, 0, 24), caches[1].view_params(0, 0, 24))


def test_topk_variant_keeps_the_largest_dense_values(ref_cache, tiny_dataset, tiny_clip_config, tiny_teacher_ckpt, tmp_path,
                                                    monkeypatch, capsys):
    out = tmp_path / "top2.zarr"
    monkeypatch.setattr("dho.precompute.MANY_FILES", 10)  # a store of more files gets a note (50k by default)
    cache = precompute(tiny_dataset.root, out, **_kwargs(tiny_clip_config, tiny_teacher_ckpt, topk=2, store_embeddings=False))
    files = sum(1 for f in out.rglob("*") if f.is_file())
    assert f"note: {out} will be {files:,} files (5 dataset shard(s) per Zarr shard" in capsys.readouterr().err
    g, ref = zarr.open_group(str(out), mode="r"), zarr.open_group(str(ref_cache), mode="r")
    assert "probs" not in g and "embeddings" not in g and g["topk_indices"].shape == (3, 24, 2)
    dense = ref["probs"][:]  # (V, N, C) float16
    idx, val = g["topk_indices"][:], g["topk_probs"][:]
    np.testing.assert_array_equal(np.take_along_axis(dense, idx.astype(np.int64), axis=2), val)
    np.testing.assert_array_equal(val[..., 0], dense.max(axis=2))
    for v in range(3):  # densified with the remainder on the one other class: close to the dense cache
        np.testing.assert_allclose(cache.probs(v, 0, 24), dense[v].astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(g["view_params"][:], ref["view_params"][:])


def _write_shard_with_broken_jpeg(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    shard = folder / "bad-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, key in enumerate(["s0", "s1", "broken", "s3"]):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (28, 36, 3), dtype=np.uint8)).save(buf, format="JPEG")
            payload = buf.getvalue()[: len(buf.getvalue()) // 2] if key == "broken" else buf.getvalue()
            for name, blob in ((f"{key}.jpg", payload), (f"{key}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    classnames = folder / "classnames.txt"
    classnames.write_text("zero\none\n")
    return shard, classnames


def test_corrupt_image_errors_or_is_recorded_invalid(tmp_path, tiny_clip_config, tiny_teacher_ckpt):
    shard, classnames = _write_shard_with_broken_jpeg(tmp_path / "shards")
    ds = data.index([shard], classnames, tmp_path / "ds")
    kw = _kwargs(tiny_clip_config, tiny_teacher_ckpt, views=1, center_view=False)
    with pytest.raises(DatasetError, match=r"shard 0 \(bad-000000.tar\) key 'broken'.*cannot decode.*--skip-bad"):
        precompute(ds.root, tmp_path / "fail.zarr", **kw)
    assert not TeacherCache.open(tmp_path / "fail.zarr").done.any()  # nothing looks complete
    cache = precompute(ds.root, tmp_path / "skip.zarr", skip_bad=True, **kw)
    assert cache.is_complete() and cache.valid.tolist() == [True, True, False, True]
    p = cache.probs(0, 0, 4)
    assert np.isnan(p[2]).all() and np.isfinite(p[[0, 1, 3]]).all()
    np.testing.assert_allclose(p[[0, 1, 3]].sum(axis=1), 1.0, atol=1e-3)
    assert cache.view_params(0, 0, 4)[2].tolist() == [-1] * 5 and np.isnan(cache.embeddings(0, 0, 4)[2]).all()
    text = CliRunner().invoke(app, ["cache-info", str(tmp_path / "skip.zarr")]).output
    assert "4/4 with all views done, 3 valid, 1 invalid" in text


def test_mismatched_dataset_or_settings_are_refused(ref_cache, tiny_dataset, tiny_clip_config, tiny_teacher_ckpt, tmp_path):
    shard, classnames = _write_shard_with_broken_jpeg(tmp_path / "shards")
    other = data.index([shard], classnames, tmp_path / "other")
    with pytest.raises(CacheError, match="does not belong to dataset .*another class list"):
        TeacherCache.open(ref_cache, dataset=other)
    copy = tmp_path / "copy.zarr"
    shutil.copytree(ref_cache, copy)
    with pytest.raises(CacheError, match="other parameters \\(num_views: 3 in the cache vs 4 now; seed: 3 in the cache vs 0 now\\)"):
        precompute(tiny_dataset.root, copy, **_kwargs(tiny_clip_config, tiny_teacher_ckpt, views=3, seed=0))
    with pytest.raises(CacheError, match="does not belong to dataset .*another class list"):
        precompute(other.root, copy, **_kwargs(tiny_clip_config, tiny_teacher_ckpt))
    with pytest.raises(CacheError, match='teacher.pretrained: "tiny-teacher.pt" in the cache vs "none" now; teacher.weights_sha256'):
        precompute(tiny_dataset.root, copy, **_kwargs(tiny_clip_config, "none"))
    _assert_same_store(ref_cache, copy)  # refused runs wrote nothing


def test_store_layout_matches_readme(ref_cache):
    arrays, attrs = _readme_tables()
    g = zarr.open_group(str(ref_cache), mode="r")
    assert set(g.array_keys()) == set(arrays) - {"topk_indices", "topk_probs"}
    assert set(g.attrs) == attrs - {"teachers", "augment"}  # ensembles (merge-caches) and --augment caches only
    for name in g.array_keys():
        assert g[name].metadata.data_type.to_json(zarr_format=3) == arrays[name][1], name
    assert g["probs"].shape == (3, 24, 3) and g["probs"].chunks == (1, 5, 3)
    assert g["embeddings"].shape == (3, 24, 32) and g["text_classifier"].shape == (3, 32)
    assert g["done"][:].all() and g.attrs["complete"] is True


def test_cache_info_output(ref_cache, tiny_dataset):
    r = subprocess.run([str(VENV_BIN / "dho"), "cache-info", str(ref_cache)], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    center = zarr.open_group(str(ref_cache), mode="r")["probs"][VIEWS].astype(np.float32)  # (N, C)
    agree = 100.0 * (center.argmax(axis=1) == tiny_dataset.labels).mean()
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"cache:      {ref_cache} (schema v{cache_schemas.CURRENT_VERSION}, dho ")
    assert re.match(r"teacher: +tiny-clip / tiny-teacher.pt \(weights sha256 [0-9a-f]{16}\.\.\.\), precision fp32", lines[1])
    assert "classifier: 7 templates (renormalize, class names underscores-to-spaces), zeta=0.01 (logit scale 100), eta=2.0" in lines
    assert "views:      3 (last = center view), seed 3; storage: dense probs (float16) + embeddings" in lines
    assert "data:       24 samples, 3 classes, 5 shards, chunk length 5, 5 shard(s) per Zarr shard" in lines
    assert "coverage:   15/15 units done (100.0%), complete: yes (chunks not read; --verify reads and checks every one)" in lines
    assert "samples:    24/24 with all views done, 24 valid, 0 invalid (unreadable, NaN rows)" in lines
    assert re.search(r"^size: +\d+\.\d\d MiB on disk in \d+ files$", r.stdout, re.M)
    assert f"agreement:  teacher top-1 vs labels {agree:.2f}% on 24 labeled valid samples (center view)" in lines


def test_cli_help_defaults_are_the_library_defaults():
    import typer

    command = typer.main.get_command(app).commands["precompute-teacher"]
    signature = inspect.signature(precompute).parameters
    checked = 0
    for param in command.params:  # the help's [default: X] is rendered from show_default (tests/test_cli_help.py)
        default = signature[param.name].default if param.name in signature else None
        if not any(default is x for x in (None, False, inspect.Parameter.empty)):  # seed 0 is checked
            assert param.show_default == str(default) and "Default:" not in param.help, param.name
            checked += 1
    assert checked == 11  # --workers: the machine's (test_workers_default_to_what_the_machine_has)


def test_workers_default_to_what_the_machine_has(tiny_dataset, tiny_clip_config, tiny_teacher_ckpt, tmp_path, monkeypatch,
                                                 capsys):
    """--workers left out: the cores of this process's affinity per local rank, less one on CUDA, half on the CPU
    (the forward's threads take the others, dho.devices.cpu_threads_beside_workers), at most 16; --help shows it."""
    from dho import devices

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, local_ranks, cuda, cpu in ((8, None, 7, 4), (8, "4", 1, 1), (1, None, 0, 0), (96, None, 16, 16), (96, "8", 11, 6)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        if local_ranks:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
        assert (devices.usable_cores(), devices.default_workers("cuda"), devices.default_workers("cpu")) == (cores, cuda, cpu)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.undo()
    help_text = devices.default_workers_help()
    assert f"({devices.usable_cores()} here" in help_text and f"({devices.default_workers('cpu')} here)" in help_text
    kw = _kwargs(tiny_clip_config, tiny_teacher_ckpt, views=1, center_view=False, store_embeddings=False)
    del kw["workers"]
    cache = precompute(tiny_dataset.root, tmp_path / "c.zarr", **kw)
    assert cache.is_complete()
    assert f"; {devices.default_workers('cpu')} DataLoader workers" in capsys.readouterr().err
