"""`--decode gpu`: views decoded and resampled on the device match the CPU path up to resampling noise.

The device path runs here on the CPU (`decode_jpeg(device="cpu")`, libjpeg-turbo): the same code as
on CUDA but the decoder. Measured on this machine (CPU, max / mean absolute difference in levels, 8
views per image, 24 and 64 px), against `replay_view_uint8` of the full PIL decode:
  bilinear: max 1, mean 0.05-0.19 for JPEG (RGB, grey, CMYK), PNG, RGBA PNG;
  bicubic:  max 1-2 when downscaling, up to 7 when upscaling noisy crops (PIL rounds and clips the
            overshooting horizontal pass to uint8 before the vertical one, torch keeps floats), mean <= 0.22.
Against the workers' `decode_view` (DCT-downscaled decode of JPEGs whose box is >= 2x the size):
mean up to 1.9, max up to 20 on high-frequency noise: that difference is the CPU path's own
draft decode, not the device path.
The CUDA test at the end (skipped without CUDA) also covers nvJPEG against PIL.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dho import data
from dho.cache import TeacherCache
from dho.distill import DistillConfig, distill
from dho.errors import ConfigError
from dho.data.gpu_views import decode_views
from dho.precompute import precompute
from dho.stream import PairedStream, Part, PartData
from fixtures_models import TINY_CLIP_CONFIG, tiny_teacher_ckpt  # noqa: F401
from helpers_data import make_image_folder

VIEWS = 8
BOUND_MAX = {"bilinear": 2, "bicubic": 8}  # levels; measured 1 and 7 (see the module docstring)
BOUND_MEAN = 0.5  # measured <= 0.22


def _pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth colour waves plus +-40 noise (hard for resamplers, unlike flat colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    waves = np.stack([128 + 100 * np.sin(x / 7.0 + c) * np.cos(y / 11.0) for c in range(3)], axis=-1)
    return np.clip(waves + rng.integers(-40, 41, (height, width, 3)), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


CASES = {  # name: (bytes, ext)
    "jpeg 64x48": (_encode(_pixels(64, 48), "JPEG"), "jpg"),
    "jpeg 37x91": (_encode(_pixels(37, 91), "JPEG"), "jpg"),
    "jpeg 640x480": (_encode(_pixels(640, 480), "JPEG"), "jpg"),
    "grey jpeg": (_encode(_pixels(50, 40), "JPEG", "L"), "jpg"),
    "cmyk jpeg": (_encode(_pixels(50, 40), "JPEG", "CMYK"), "jpg"),
    "png": (_encode(_pixels(45, 60), "PNG"), "png"),
    "rgba png": (_encode(_pixels(45, 60), "PNG", "RGBA"), "png"),
}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("name", list(CASES))
def test_device_views_match_the_cpu_replay(name, interpolation):
    blob, ext = CASES[name]
    image = data.decode_image(blob, ext, name)
    params = [data.view_params(name, v, 0, image.width, image.height) for v in range(VIEWS)]
    assert 0 < sum(p[4] for p in params) < VIEWS  # both flipped and unflipped views
    for size in (24, 64):  # downscaled and upscaled crops
        got = decode_views([blob] * VIEWS, [ext] * VIEWS, torch.tensor([[int(x) for x in p] for p in params]),
                           size, interpolation, "cpu")
        assert got.dtype == torch.uint8 and got.shape == (VIEWS, 3, size, size)
        want = torch.stack([data.replay_view_uint8(image, p, size, interpolation) for p in params])  # (V, 3, S, S)
        diff = (got.int() - want.int()).abs()
        report = f"{name} {interpolation} {size}px: max {diff.max().item()} mean {diff.float().mean().item():.3f} levels"
        assert diff.max().item() <= BOUND_MAX[interpolation], report
        assert diff.float().mean().item() < BOUND_MEAN, report
        # a flipped view is the mirror of the unflipped one: flipping the box after resampling, as PIL does
        flipped = [i for i, p in enumerate(params) if p[4]]
        unflipped = decode_views([blob], [ext], torch.tensor([[int(x) for x in params[flipped[0]][:4]] + [0]]),
                                 size, interpolation, "cpu")
        assert torch.equal(got[flipped[0]], unflipped[0].flip(-1))


def test_a_box_outside_the_image_is_refused():
    blob, ext = CASES["jpeg 64x48"]
    with pytest.raises(data.DatasetError, match="lies outside the 64x48 image"):
        decode_views([blob], [ext], torch.tensor([[0, 10, 48, 60, 0]]), 24, "bilinear", "cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher_ckpt):
    """3 classes x 6 JPEGs plus a grey JPEG and a PNG, a 2-shot labeled split, caches of 2 views."""
    root = tmp_path_factory.mktemp("gpu_views")
    src = make_image_folder(root / "images", num_classes=3, per_class=6)
    Image.fromarray(_pixels(40, 30, seed=1)).convert("L").save(src / "class_1" / "grey.jpg", quality=90)
    Image.fromarray(_pixels(30, 44, seed=2)).save(src / "class_2" / "picture.png")
    full = data.prepare(src, root / "full", shard_size=8)
    labeled, _ = data.split(full, root / "labeled", shots=2, seed=0, shard_size=4)
    teacher = dict(model=str(TINY_CLIP_CONFIG), pretrained=str(tiny_teacher_ckpt), views=2, device="cpu", workers=0, batch_size=16)
    precompute(full.root, root / "full.zarr", **teacher)
    precompute(labeled.root, root / "labeled.zarr", **teacher)
    return root


def _stream(world, raw: bool) -> PairedStream:
    return PairedStream([], [PartData.open(Part(world / "full", world / "full.zarr"))], micro_l=0, micro_u=20, seed=0, rank=0,
                        world_size=1, num_workers=0, start_item=0, view_sampling="cycle", image_size=24,
                        interpolation="bicubic", eta=2.0, raw=raw)


def test_raw_stream_yields_the_bytes_and_boxes_of_the_same_views(world):
    full = data.Dataset.open(world / "full")
    cache = TeacherCache.open(world / "full.zarr", dataset=full)
    decoded, raw = next(iter(_stream(world, raw=False))).u, next(iter(_stream(world, raw=True))).u
    assert raw.image is None and decoded.data is decoded.ext is decoded.params is None
    assert None not in (raw.data, raw.ext, raw.params)
    for k in ("label", "probs", "index"):  # same samples, same order, same targets
        assert torch.equal(getattr(decoded, k), getattr(raw, k)), k
    samples = {s.key: s for i in range(len(full.shards)) for s in data.iter_shard(full, i, decode=False)}
    keys = [k for i in range(len(full.shards)) for k in full.shards[i].keys]
    for row, index in enumerate(raw.index.tolist()):
        assert raw.data[row] == samples[keys[index]].data and raw.ext[row] == samples[keys[index]].ext
        assert raw.params[row].tolist() == [int(x) for x in cache.view_params(0, index, index + 1)[0]]  # pass 0 -> view 0
    assert {"png", "jpg"} <= set(raw.ext)
    views = decode_views(raw.data, raw.ext, raw.params, 24, "bicubic", "cpu")  # (20, 3, 24, 24)
    diff = (views.int() - decoded.image.int()).abs()
    report = f"raw stream vs workers: max {diff.max().item()} mean {diff.float().mean().item():.3f} levels"
    print(report)
    assert diff.max().item() <= BOUND_MAX["bicubic"] and diff.float().mean().item() < BOUND_MEAN, report


def _cfg(world, out, **kw) -> DistillConfig:
    base = dict(labeled=str(world / "labeled"), labeled_cache=str(world / "labeled.zarr"), unlabeled=str(world / "full"),
                unlabeled_cache=str(world / "full.zarr"), student="resnet-tiny", out=str(out), epochs=2, batch_size=4,
                lr=3e-3, workers=0, device="cpu", log_every=1, seed=0)
    base.update(kw)
    return DistillConfig(**base)


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _assert_close_losses(a: list[float], b: list[float]) -> None:
    """Step 1 sees the same weights and views that differ by resampling noise: within 2% (measured 0.9%);
    the steps after follow weights that have drifted apart at lr 3e-3: within 25% (measured <= 16%)."""
    report = f"decode cpu {a} vs device decode {b}"
    np.testing.assert_allclose(b[0], a[0], rtol=0.02, err_msg=report)
    np.testing.assert_allclose(b, a, rtol=0.25, err_msg=report)
    assert b[-1] < b[0], report


def test_decode_gpu_needs_cuda_and_a_known_choice(world, tmp_path):
    with pytest.raises(ConfigError, match=r"--decode gpu needs a CUDA device .*; use --decode cpu") as e:
        distill(_cfg(world, tmp_path / "run", decode="gpu"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--decode must be one of cpu, gpu"):
        _cfg(world, tmp_path / "run2", decode="nvjpeg")


@pytest.mark.parametrize("workers", [0, 2])
def test_distill_through_the_raw_path_on_cpu(world, tmp_path, monkeypatch, workers):
    """The whole --decode gpu path (workers -> bytes -> decode on the training device) with the CPU as
    the device: the CUDA check is lifted for the test only; losses follow the CPU path's closely."""
    import dho.distill.loop

    cpu = distill(_cfg(world, tmp_path / "cpu", workers=workers, max_steps=4))
    monkeypatch.setattr(dho.distill.loop, "_check_decode", lambda decode, device: None)
    dev = distill(_cfg(world, tmp_path / "dev", workers=workers, max_steps=4, decode="gpu"))
    a, b = _losses(cpu), _losses(dev)
    assert len(a) == len(b) == 4
    _assert_close_losses(a, b)
    assert json.loads((tmp_path / "dev" / "config.json").read_text())["decode"] == "gpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_gpu_on_cuda_matches_the_cpu_path(world, tmp_path):
    full = data.Dataset.open(world / "full")
    samples = [s for i in range(len(full.shards)) for s in data.iter_shard(full, i, decode=False)]
    cache = TeacherCache.open(world / "full.zarr", dataset=full)
    params = torch.as_tensor(np.asarray(cache.view_params(0, 0, len(samples)), dtype=np.int64))  # (N, 5)
    for interpolation in ("bilinear", "bicubic"):
        got = decode_views([s.data for s in samples], [s.ext for s in samples], params, 24, interpolation, "cuda")
        assert got.device.type == "cuda"
        want = torch.stack([data.replay_view_uint8(data.decode_image(s.data, s.ext, s.key), p.tolist(), 24, interpolation)
                            for s, p in zip(samples, params)])
        diff = (got.cpu().int() - want.int()).abs()
        report = f"nvJPEG {interpolation}: max {diff.max().item()} mean {diff.float().mean().item():.3f} levels"
        print(report)
        assert diff.max().item() <= BOUND_MAX[interpolation] + 2 and diff.float().mean().item() < 1.0, report
    common = dict(device="cuda", precision="fp32", workers=2, max_steps=4)
    a = _losses(distill(_cfg(world, tmp_path / "cpu", **common)))
    b = _losses(distill(_cfg(world, tmp_path / "gpu", decode="gpu", **common)))
    _assert_close_losses(a, b)
