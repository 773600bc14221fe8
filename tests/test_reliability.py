"""Inputs that used to lose data or give silently wrong results: overwrites, leftovers of killed writers,
16-bit and float images, truncated tars, damaged caches, the device resolver."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder
from PIL import Image

from dho import data
from dho.atomic import remove_stale
from dho.cache import TeacherCache
from dho.cache_info import summarize
from dho.devices import resolve_device
from dho.errors import CacheError, ConfigError, DatasetError
from dho.precompute import precompute

DHO = str(Path(sys.executable).parent / "dho")


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------ overwrite


def test_overwrite_replaces_a_dho_dataset_and_nothing_else(tmp_path):
    src = make_image_folder(tmp_path / "src", num_classes=2, per_class=3)
    out = tmp_path / "ds"
    data.prepare(src, out, shard_size=2)
    first = {p.name for p in out.iterdir()}
    data.prepare(src, out, shard_size=4, overwrite=True)  # a dho dataset: replaced
    columns = {f"manifest.{data.Dataset.open(out).fingerprint[:16]}.{c}.npy" for c in ("keys", "labels", "files", "spans", "digests")}
    assert {p.name for p in out.iterdir()} == {"manifest.json", "shard-000000.tar", "shard-000001.tar"} | columns != first
    (out / "my-notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files that are not part of its dataset .*my-notes.txt"):
        data.prepare(src, out, shard_size=2, overwrite=True)
    assert (out / "my-notes.txt").read_text() == "mine"
    for bad_out, relation in ((src, "is the source"), (src / "class_0" / "x", "is inside the source"), (tmp_path, "contains the source")):
        with pytest.raises(ConfigError, match=relation):
            data.prepare(src, bad_out, overwrite=True)
    assert len(list(src.rglob("*.jpg"))) == 6  # the source is untouched
    lab = tmp_path / "lab"
    data.split(out, lab, shots=1, seed=0)
    with pytest.raises(ConfigError, match="is inside the source"):
        data.split(out, out / "lab", shots=1, seed=0)
    data.split(out, lab, shots=2, seed=0, overwrite=True)
    assert data.Dataset.open(lab).num_samples == 4


def test_leftovers_of_killed_writers_are_cleaned_by_the_next_run(tmp_path, tiny_teacher_ckpt):
    src = make_image_folder(tmp_path / "src", num_classes=2, per_class=3)
    dead, alive = _dead_pid(), os.getpid()
    stale = [tmp_path / f".ds.tmp-{dead}-0badc0de", tmp_path / f".ds.old-{dead}-0badc0de"]
    live = tmp_path / f".ds.tmp-{os.getppid()}-0badc0de"  # a writer that still runs: left alone
    for p in stale + [live]:
        p.mkdir()
        (p / "shard-000000.tar").write_bytes(b"half")
    data.prepare(src, tmp_path / "ds", shard_size=4)
    assert not any(p.exists() for p in stale) and live.exists()
    # precompute: a creator killed before its rename
    creating = tmp_path / f".c.zarr.creating-{dead}-0badc0de"
    creating.mkdir()
    (creating / "zarr.json").write_text("{}")
    precompute(tmp_path / "ds", tmp_path / "c.zarr", model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=1,
               device="cpu", workers=0)
    assert not creating.exists() and TeacherCache.open(tmp_path / "c.zarr").is_complete()
    # export: a file of an export killed while writing
    half = tmp_path / f".model.ts.tmp-{dead}-0badc0de"
    half.write_bytes(b"half")
    assert remove_stale(tmp_path / "model.ts") == [half] and not half.exists()
    assert alive == os.getpid()


# ------------------------------------------------------------------------------------ decoding


def _encoded(image: Image.Image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_16_bit_float_palette_cmyk_and_alpha_images_become_correct_8_bit_rgb():
    ramp16 = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 31).astype(np.uint16)  # 0 .. 63,457
    png16 = data.decode_image(_encoded(Image.fromarray(ramp16), "PNG"), "png", "ramp16.png")
    grey = np.asarray(png16)[..., 0].astype(np.float64)
    np.testing.assert_allclose(grey, np.round(ramp16 / 65535.0 * 255.0), atol=1)  # PIL's convert("RGB") clips this to ~white
    assert grey.mean() < 200 and png16.mode == "RGB"

    ramp_f = np.linspace(0.0, 1.0, 32 * 64, dtype=np.float32).reshape(32, 64)
    tif = data.decode_image(_encoded(Image.fromarray(ramp_f, "F"), "TIFF"), "tif", "ramp.tif")
    np.testing.assert_allclose(np.asarray(tif)[..., 0], np.round(ramp_f * 255.0), atol=1)  # not all black

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, ..., 3] = 255  # top half opaque red, bottom half fully transparent
    out = np.asarray(data.decode_image(_encoded(Image.fromarray(rgba, "RGBA"), "PNG"), "png", "alpha.png"))
    assert out[0, 0].tolist() == [200, 0, 0] and out[7, 7].tolist() == [255, 255, 255]  # transparent -> white

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    out = np.asarray(data.decode_image(_encoded(palette, "PNG"), "png", "palette.png"))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [255, 255, 255]

    la = Image.fromarray(np.stack([np.full((4, 4), 50, np.uint8), np.full((4, 4), 255, np.uint8)], -1), "LA")
    assert np.asarray(data.decode_image(_encoded(la, "PNG"), "png", "la.png"))[0, 0].tolist() == [50, 50, 50]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(data.decode_image(_encoded(cmyk, "JPEG"), "jpg", "cmyk.jpg"))[0, 0].tolist()[0] > 200


def test_prepare_lists_the_files_it_does_not_read(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", num_classes=2, per_class=2)
    (src / "class_0" / "notes.txt").write_text("hello")
    (src / "class_1" / "IMG_1.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    shutil.copy(next((src / "class_0").glob("*.jpg")), src / "class_1" / "photo.jfif")  # a JPEG: read
    ds = data.prepare(src, tmp_path / "ds", shard_size=8)
    assert ds.num_samples == 5
    ignored = {i["file"]: i["reason"] for i in ds.manifest["ignored"]}
    assert set(ignored) == {"class_0/notes.txt", "class_1/IMG_1.HEIC"}
    assert "HEIC needs a plug-in" in ignored["class_1/IMG_1.HEIC"]
    err = capsys.readouterr().err
    assert "ignored 2 file(s) that are not images dho reads (.heic: 1, .txt: 1)" in err


# ------------------------------------------------------------------------------------ tars


@pytest.mark.parametrize("cut", ["inside a header", "inside a member", "before the end marker"])
def test_index_refuses_a_truncated_tar_naming_it(tmp_path, cut):
    src = make_image_folder(tmp_path / "src", num_classes=2, per_class=3)
    ds = data.prepare(src, tmp_path / "ds", shard_size=6, shuffle=False)
    shard = ds.shards[0].path
    raw = shard.read_bytes()
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    third = members[len(members) // 2]
    at = {"inside a header": third.offset + 100, "inside a member": third.offset_data + 10,
          "before the end marker": members[-1].offset_data + members[-1].size}[cut]
    cut_shard = tmp_path / "cut.tar"
    cut_shard.write_bytes(raw[:at])
    (tmp_path / "classes.txt").write_text("class_0\nclass_1\n")
    with pytest.raises(DatasetError, match=rf"shard {cut_shard}: .*truncated|shard {cut_shard}: not a readable tar"):
        data.index([cut_shard], tmp_path / "classes.txt", tmp_path / "idx")
    assert not (tmp_path / "idx" / "manifest.json").exists()
    data.index([shard], tmp_path / "classes.txt", tmp_path / "ok")  # the whole shard indexes


# ------------------------------------------------------------------------------------ damaged caches


@pytest.fixture(scope="module")
def cache_world(tmp_path_factory, tiny_teacher_ckpt) -> Path:
    root = tmp_path_factory.mktemp("cache")
    src = make_image_folder(root / "src", num_classes=3, per_class=4)
    data.prepare(src, root / "ds", shard_size=4)
    kw = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cpu", workers=0, store_embeddings=True)
    precompute(root / "ds", root / "c.zarr", shard_group=1, **kw)  # a file per unit (what v3 always wrote)
    precompute(root / "ds", root / "sharded.zarr", **kw)  # the default: the 3 shards in one Zarr shard per view
    return root


def _damaged_copy(cache_world: Path, tmp_path: Path) -> Path:
    out = tmp_path / "c.zarr"
    shutil.copytree(cache_world / "c.zarr", out)
    return out


def test_every_chunk_has_a_checksum_and_every_chunk_is_stored(cache_world):
    import zarr
    from zarr.codecs import Crc32cCodec, ShardingCodec

    g = zarr.open_group(str(cache_world / "c.zarr"), mode="r")
    for name in g.array_keys():
        codecs = g[name].metadata.codecs
        if isinstance(codecs[0], ShardingCodec):  # v4's per-view arrays: the inner chunks and the index
            assert any(isinstance(c, Crc32cCodec) for c in codecs[0].index_codecs), name
            codecs = codecs[0].codecs
        assert any(isinstance(c, Crc32cCodec) for c in codecs), name
    # 3 shards x 2 views: every chunk of probs, view_params and embeddings exists, and one valid chunk per shard
    for name in ("probs", "view_params", "embeddings"):
        assert len([f for f in (cache_world / "c.zarr" / name / "c").rglob("*") if f.is_file()]) == 6, name
    assert sorted(p.name for p in (cache_world / "c.zarr" / "valid" / "c").iterdir()) == ["0", "1", "2"]
    assert TeacherCache.open(cache_world / "c.zarr").verify() == []


def test_a_flipped_byte_is_a_checksum_error_naming_the_chunk(cache_world, tmp_path):
    cache = _damaged_copy(cache_world, tmp_path)
    chunk = cache / "probs" / "c" / "1" / "2" / "0"  # view 1, rows of shard 2
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    chunk.write_bytes(bytes(raw))
    tc = TeacherCache.open(cache)
    with pytest.raises(CacheError, match=r"array 'probs', view 1, shard 2 \(rows 8-11, chunk 2\) is damaged \(its checksum"):
        tc.probs(1, 8, 12)
    tc.probs(0, 8, 12)  # the other units read fine
    problems = tc.verify()
    assert len(problems) == 1 and "view 1, shard 2" in problems[0]
    proc = subprocess.run([DHO, "cache-info", str(cache), "--verify"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "1 damaged unit(s)" in proc.stdout and "view 1, shard 2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    ok = subprocess.run([DHO, "cache-info", str(cache_world / "c.zarr"), "--verify"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "every chunk of every finished unit read back intact" in ok.stdout


def test_missing_chunks_are_errors_not_fill_values(cache_world, tmp_path):
    cache = _damaged_copy(cache_world, tmp_path)
    (cache / "probs" / "c" / "0" / "1" / "0").unlink()
    with pytest.raises(CacheError, match=r"array 'probs', view 0, shard 1 .* not a distribution \(sum nan"):
        TeacherCache.open(cache).probs(0, 4, 8)
    (cache / "view_params" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(CacheError, match=r"array 'view_params', view 1, shard 0 .* has no crop box"):
        TeacherCache.open(cache).view_params(1, 0, 4)
    (cache / "valid" / "c" / "2").unlink()  # would read as "all unreadable" and drop the shard from training
    with pytest.raises(CacheError, match=r"array 'valid', shard 2 .* the chunk file valid/c/2 is missing"):
        TeacherCache.open(cache).valid


def _flip_byte(f: Path) -> None:
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, array, chunk", [
    ("flip", "keys", "keys/c/1/0"), ("flip", "labels", "labels/c/2"), ("flip", "text_classifier", "text_classifier/c/0/0"),
    ("delete", "done", "done/c/0/1"),  # a complete cache takes every flag as 1 without reading done: --verify reads it
])
def test_verify_reads_every_array_and_cache_info_names_the_damaged_one(cache_world, tmp_path, damage, array, chunk):
    """`dho cache-info --verify` reads keys, labels, valid, done and text_classifier too, not only the finished units;
    `dho cache-info` without it reads labels (the agreement): a damaged chunk is one line naming the array and chunk."""
    cache = _damaged_copy(cache_world, tmp_path)
    _flip_byte(cache / chunk) if damage == "flip" else (cache / chunk).unlink()
    proc = subprocess.run([DHO, "cache-info", str(cache), "--verify"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert re.fullmatch(rf"error: .*array '{array}', chunk .*file {chunk}\)?(:| is damaged)"
                        r".*rebuild the cache with `dho precompute-teacher` into a new --out\n", proc.stderr), proc.stderr
    plain = subprocess.run([DHO, "cache-info", str(cache)], capture_output=True, text=True, timeout=120)
    if array == "labels":
        assert plain.returncode == 2 and "Traceback" not in plain.stderr and len(plain.stderr.splitlines()) == 1
        assert f"array 'labels', chunk 2 (rows 8-11, file {chunk}) is damaged (its checksum" in plain.stderr
    else:
        assert plain.returncode == 0 and "agreement:" in plain.stdout
        assert "1 damaged array(s)" in proc.stdout and "read back intact" not in proc.stdout
    with pytest.raises(CacheError, match=f"array '{array}'"):
        TeacherCache.open(cache).check_arrays()


@pytest.mark.parametrize("array, chunk", [("keys", "keys/c/0/0"), ("labels", "labels/c/1"), ("text_classifier", "text_classifier/c/0/0")])
def test_distill_refuses_a_cache_whose_keys_labels_or_classifier_are_damaged(cache_world, tmp_path, array, chunk):
    """distill reads none of these to train, so they are read (and checksummed) when it opens the cache. The
    labels case runs the `dho` executable; the others `dho.cli.main()` in this process, as the console script does
    (a distill process spends ~10 s importing on 2 busy cores)."""
    import contextlib
    import io

    from dho import cli

    cache = _damaged_copy(cache_world, tmp_path)
    _flip_byte(cache / chunk)
    ds = str(cache_world / "ds")
    args = ["distill", "--labeled", ds, "--labeled-cache", str(cache), "--unlabeled", ds, "--unlabeled-cache", str(cache),
            "--student", "resnet-tiny", "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "4",
            "--workers", "0", "--device", "cpu"]
    if array == "labels":
        proc = subprocess.run([DHO, *args], capture_output=True, text=True, timeout=300)
        code, err = proc.returncode, proc.stderr
    else:
        buf, argv, sys.argv = io.StringIO(), sys.argv, ["dho", *args]
        try:
            with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_:
                cli.main()
        finally:
            sys.argv = argv
        code, err = exit_.value.code, buf.getvalue()
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: .*c\.zarr: array '{array}', chunk .*file {chunk}\) is damaged \(its checksum does not match "
                        r"the data\); rebuild the cache with `dho precompute-teacher` into a new --out", last), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_damage_inside_a_zarr_shard_is_reported_per_unit(cache_world, tmp_path):
    """v4's Zarr shards: a flipped byte fails the checksum of the one inner chunk (unit) it lands in, or the
    shard's index (then every unit of that file); a missing shard file reads as NaN rows, an error."""
    cache = tmp_path / "s.zarr"
    shutil.copytree(cache_world / "sharded.zarr", cache)
    tc = TeacherCache.open(cache)
    assert tc.shard_group == 3 and sorted(p.name for p in (cache / "probs" / "c").rglob("*") if p.is_file()) == ["0", "0"]
    first = cache / "probs" / "c" / "1" / "0" / "0"  # view 1, shards 0-2
    raw = bytearray(first.read_bytes())
    raw[10] ^= 0x40  # inside the first inner chunk: view 1, shard 0
    first.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=r"array 'probs', view 1, shard 0 \(rows 0-3, chunk 0\) is damaged \(its checksum"):
        TeacherCache.open(cache).probs(1, 0, 4)
    problems = TeacherCache.open(cache).verify()
    assert len(problems) == 1 and "view 1, shard 0" in problems[0]
    raw[10] ^= 0x40
    raw[-6] ^= 0x01  # the shard index (at the end, crc32c-checked)
    first.write_bytes(bytes(raw))
    problems = TeacherCache.open(cache).verify()
    assert len(problems) == 3 and all("view 1" in p for p in problems)
    (cache / "probs" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(CacheError, match=r"array 'probs', view 0, shard 2 .* not a distribution \(sum nan"):
        TeacherCache.open(cache).probs(0, 8, 12)


def test_a_v1_cache_without_checksums_still_gets_the_row_checks(tmp_path):
    import zarr

    asset = Path(__file__).parent / "assets" / "v1-cache"
    shutil.copytree(asset, tmp_path / "v1")
    g = zarr.open_group(str(tmp_path / "v1" / "cache.zarr"), mode="r+")
    probs = g["probs"][0, 0:4]
    probs[1] = np.float16(-1797.0)  # what a flipped exponent bit reads back as
    g["probs"][0, 0:4] = probs
    with pytest.raises(CacheError, match=r"sample .* not a distribution .*min -1797"):
        TeacherCache.open(tmp_path / "v1" / "cache.zarr").probs(0, 0, 4)
    assert summarize(tmp_path / "v1" / "cache.zarr")["schema_version"] == 1


# ------------------------------------------------------------------------------------ devices


def test_one_device_resolver_for_every_command(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        for spec in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(ConfigError, match="no CUDA device is visible"):
                resolve_device(spec)
    for spec in ("gpu7", "tpu", "cuda:", "cuda:-1", "mps:0"):
        with pytest.raises(ConfigError, match=r"--device must be auto \(cuda if available\), cpu, cuda or cuda:N"):
            resolve_device(spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)  # under torchrun: this rank's GPU
    with pytest.raises(ConfigError, match="under torchrun would put every rank on one GPU"):
        resolve_device("cuda:0")


def test_predict_reads_the_images_of_a_folder(tmp_path):
    from helpers_student import make_trained_run

    from dho import evaluate as ev

    src = make_image_folder(tmp_path / "src", num_classes=3, per_class=2)
    ds = data.prepare(src, tmp_path / "ds", shard_size=6)
    run = make_trained_run(tmp_path / "run", ds, steps=2)
    (src / "class_1" / "notes.txt").write_text("not an image")
    got = ev.predict(run, [src / "class_1", src / "class_0" / "img_000.jpg"], topk=2)
    assert [p.name for p, _ in got] == ["img_000.jpg", "img_001.jpg", "img_000.jpg"]
    assert all(len(top) == 2 for _, top in got)


def test_config_values_are_typed_against_the_config():
    from dho.distill import DistillConfig

    cfg = DistillConfig(labeled="l", labeled_cache="c", student="resnet18", out="o", lr="5e-5", epochs=3.0, max_steps="7")
    assert cfg.lr == 5e-5 and isinstance(cfg.lr, float) and cfg.epochs == 3 and isinstance(cfg.epochs, int) and cfg.max_steps == 7
    with pytest.raises(ConfigError, match=r"--epochs must be an integer; got 2.5"):
        DistillConfig(labeled="l", labeled_cache="c", student="resnet18", out="o", epochs=2.5)
    with pytest.raises(ConfigError, match=r"--eval-every-epoch must be true or false; got 'yes'"):
        DistillConfig(labeled="l", labeled_cache="c", student="resnet18", out="o", eval_every_epoch="yes")
    assert json.loads(json.dumps(cfg.__dict__))["lr"] == 5e-5
