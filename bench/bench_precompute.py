"""Pipeline efficiency of `dho precompute-teacher`: full precompute images/s over bare teacher images/s.

    python bench/bench_precompute.py [--model ViT-S-32 --device cpu --batch-size 32 --precision fp32 --images 256]

Both sides use the same teacher (random init: `--pretrained none`), batch size and autocast dtype.
- bare: teacher forward (encode_images -> logits -> softmax) on pre-made tensors already on the device;
- precompute: the real `dho.precompute.precompute` on a generated dataset (JPEG shards): decode,
  crop/resize every view in DataLoader workers, teacher forward, float16 chunk writes, fsync.
Images = sample-views. Also prints achieved TFLOP/s (FLOPs of one batch counted with
torch.utils.flop_counter.FlopCounterMode) and on-disk cache bytes per (sample, view), dense and top-k.
Goal: ratio >= 0.9. Timings are ratios within one run on one machine; never asserted in tests.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dho import data  # noqa: E402
from dho.cache_info import disk_size  # noqa: E402
from dho.precompute import precompute  # noqa: E402
from dho.teacher import load_teacher  # noqa: E402


def make_dataset(root: Path, images: int, num_classes: int, shard_size: int, size=(320, 240)) -> Path:
    """JPEG shards of `images` smooth random photos-like images, indexed with `num_classes` class names."""
    rng = np.random.default_rng(0)
    src = root / "images"
    for i in range(images):
        folder = src / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 255, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize(size, Image.Resampling.BILINEAR)  # smooth, JPEG-sized like a photo
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (folder / f"img_{i:05d}.jpg").write_bytes(buf.getvalue())
    prepared = data.prepare(src, root / "prepared", shard_size=shard_size)
    names = root / "classnames.txt"  # the teacher classifies over num_classes (ImageNet names), not 4
    imagenet = list(open_clip.IMAGENET_CLASSNAMES[:num_classes])
    unique = [c if imagenet.index(c) == i else f"{c} ({i})" for i, c in enumerate(imagenet)]  # 'crane' x2, ...
    names.write_text("\n".join(unique) + "\n")
    data.index([s.path for s in prepared.shards], names, root / "dataset")
    return root / "dataset"


def bare_forward(teacher, batch_size: int, images: int, zeta: float, eta: float) -> float:
    """images/s of encode_images -> logits -> softmax on pre-made device tensors (after one warm-up batch)."""
    size = teacher.preprocess.image_size
    x = torch.randn(batch_size, 3, size, size, device=teacher.device)
    steps = max(1, images // batch_size)

    def step():
        with torch.inference_mode():
            p = torch.softmax(teacher.logits(teacher.encode_images(x), zeta) / eta, dim=-1)
            return p.to(torch.float16).cpu()

    step()
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(steps):
        step()
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.time() - t0)


def flops_per_image(teacher, batch_size: int) -> float:
    size = teacher.preprocess.image_size
    x = torch.randn(batch_size, 3, size, size, device=teacher.device)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        teacher.encode_images(x)
    return counter.get_total_flops() / batch_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-S-32", help="open_clip model name or config JSON (random init)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.compile the teacher in both the bare forward and the pipeline (precompute-teacher's "
                         "default on CUDA); default off, so the ratio compares like with like on any device")
    ap.add_argument("--images", type=int, default=256, help="samples in the generated dataset")
    ap.add_argument("--views", type=int, default=2, help="views per sample (each image is decoded once)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the precompute run")
    ap.add_argument("--classes", type=int, default=100, help="classes of the zero-shot classifier (ImageNet names)")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--topk", type=int, default=10, help="K of the extra top-k run whose cache size is reported; 0 = skip it")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        ds_path = make_dataset(tmp, args.images, args.classes, args.shard_size)
        build_s = time.time() - t0
        ds = data.Dataset.open(ds_path)
        n_images = args.images * args.views
        common = dict(model=args.model, pretrained="none", templates="simple", views=args.views,
                      batch_size=args.batch_size, precision=args.precision, device=args.device, workers=args.workers,
                      progress_every_s=1e9, compile=args.compile)

        # bare forward before and after the pipeline run: the mean cancels slow drifts of a shared machine
        teacher = load_teacher(args.model, "none", args.device, args.precision, classnames=ds.classnames,
                               templates="simple", verbose=False, compile=args.compile)
        flops = flops_per_image(teacher, args.batch_size)
        bare_before = bare_forward(teacher, args.batch_size, n_images, 0.01, 2.0)
        stats: dict = {}
        cache = precompute(ds_path, tmp / "dense.zarr", stats=stats, **common)
        bare_after = bare_forward(teacher, args.batch_size, n_images, 0.01, 2.0)
        del teacher
        bare = (bare_before + bare_after) / 2
        pipeline = stats["images"] / stats["loop_s"]
        dense_bytes = disk_size(cache.path / "probs") / n_images
        total_bytes = disk_size(cache.path) / n_images
        if args.topk:
            topk_stats: dict = {}
            topk_cache = precompute(ds_path, tmp / "topk.zarr", topk=args.topk, stats=topk_stats, **common)
            topk_bytes = (disk_size(topk_cache.path / "topk_indices") + disk_size(topk_cache.path / "topk_probs")) / n_images

    if args.device.startswith("cuda"):
        dev = torch.cuda.get_device_name()
    else:
        dev = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})"
    print(f"model {args.model} (random init), {args.precision}, batch {args.batch_size}, device {dev}")
    print(f"data: {args.images} JPEG images 320x240 in {len(ds.shards)} shards ({build_s:.1f}s to build), {args.views} views "
          f"-> {n_images} images, {args.classes} classes, {args.workers} DataLoader workers")
    print(f"teacher FLOPs per image: {flops / 1e9:.2f} GFLOP")
    print(f"bare teacher forward:  {bare:8.1f} images/s  ({bare * flops / 1e12:.3f} TFLOP/s; before {bare_before:.1f}, after {bare_after:.1f})")
    print(f"full precompute:       {pipeline:8.1f} images/s  ({pipeline * flops / 1e12:.3f} TFLOP/s), "
          f"setup {stats['setup_s']:.1f}s (teacher + store), loop {stats['loop_s']:.1f}s")
    steady = stats["images"] / (stats["loop_s"] - stats["first_batch_s"])
    print(f"pipeline efficiency:   {pipeline / bare:.3f}  (goal >= 0.9); after the first batch "
          f"({stats['first_batch_s']:.1f}s of worker start-up): {steady:.1f} images/s = {steady / bare:.3f}")
    print(f"cache bytes per (sample, view): dense probs {dense_bytes:.0f} B on disk ({2 * args.classes} B raw float16), "
          f"whole store {total_bytes:.0f} B")
    if args.topk:
        print(f"cache bytes per (sample, view): top-{args.topk} {topk_bytes:.0f} B on disk ({6 * args.topk} B raw int32 + float16); "
              f"top-k run {topk_stats['images'] / topk_stats['loop_s']:.1f} images/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
