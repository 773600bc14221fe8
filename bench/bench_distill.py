"""Throughput of `dho distill` as ratios within one run (never asserted in tests).

    python bench/bench_distill.py [--student resnet-tiny --teacher ViT-S-32 --device cpu --batch-size 32 --steps 30]
    python bench/bench_distill.py --student ViT-B-16-quickgelu --teacher ViT-H-14-378-quickgelu --device cuda \
        --precision bf16 --batch-size 128 --steps 60 --workers 8 --images 8192 --views 1 --classes 1000   # on a GPU

Use more images than steps x batch: `distill` checkpoints at every epoch's end, and with a tiny
dataset those saves would fall inside the measurement (real epochs are thousands of steps).

Three measurements of the same student, loss (dho, Eq. 6-7), optimiser (AdamW), batch (B labeled +
B unlabeled) and precision, all with random-init weights:
- distill:      the real `dho.distill.distill` from JPEG shards + a teacher cache made by the real
                `precompute` (decode + crop replay in DataLoader workers); steady-state samples/s
                from its metrics (the first interval, with worker start-up, is dropped);
- student-only: the same training step on synthetic tensors already on the device;
- online:       the student-only step plus the teacher's forward on the same batch at the
                teacher's resolution inside every step, as the paper's reference code does
                (synthetic tensors, so this is an upper bound on online distillation speed).
Ratios: data-path efficiency = distill / student-only (goal >= 0.9), and the reason the tool exists,
cache speed-up = distill / online. Samples = labeled + unlabeled images per second.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dho import data, losses  # noqa: E402
from dho.distill import DistillConfig, distill  # noqa: E402
from dho.precompute import precompute  # noqa: E402
from dho.students import build_student  # noqa: E402
from dho.teacher import load_teacher  # noqa: E402


def make_images(root: Path, images: int, num_classes: int, size: tuple[int, int], noise: float) -> tuple[Path, float]:
    """An ImageFolder of random JPEGs, `num_classes` folders: smooth blobs plus Gaussian grain of std
    `noise`, so that the files cost what photos cost to decode (at 500x375 and noise 16 they are
    ~90 KB, like ImageNet's average JPEG). Returns (root, mean KB per file)."""
    rng = np.random.default_rng(0)
    grain = rng.normal(0.0, noise, (size[1] + 64, size[0] + 64, 3)).astype(np.int16)  # shifted per image
    total = 0
    for i in range(images):
        folder = root / f"class_{i % num_classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 255, size=(max(size[1] // 16, 1), max(size[0] // 16, 1), 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
        dy, dx = rng.integers(0, 64, 2)
        pixels = np.clip(pixels + grain[dy : dy + size[1], dx : dx + size[0]], 0, 255).astype(np.uint8)  # (H, W, 3)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        (folder / f"img_{i:06d}.jpg").write_bytes(buf.getvalue())
        total += buf.tell()
    return root, total / images / 1024


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def step_rate(student, device, precision, batch: int, num_classes: int, steps: int, teacher=None, compile: bool = False) -> float:
    """Samples/s of the dho training step on synthetic device tensors (optionally with an online teacher;
    `compile`: the student's forward through torch.compile, as `dho distill --compile`)."""
    size = student.preprocess.image_size
    x = torch.randn(2 * batch, 3, size, size, device=device)  # (2B, 3, S, S) labeled ; unlabeled
    y = torch.randint(0, num_classes, (batch,), device=device)
    p = torch.softmax(torch.randn(2 * batch, num_classes, device=device), dim=-1)  # (2B, C)
    if teacher is not None:
        t_size = teacher.preprocess.image_size
        x_t = torch.randn(2 * batch, 3, t_size, t_size, device=device)  # the teacher's own resolution
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")  # as distill
    student.train()
    forward = torch.compile(student) if compile else student

    def one_step():
        nonlocal p
        if teacher is not None:
            with torch.no_grad(), _autocast(device, precision):  # no_grad: its output feeds the student's loss
                z_t = teacher.encode_images(x_t)  # (2B, D) normalised
                p = torch.softmax(z_t.float() @ teacher.text_classifier.T.float() / (0.01 * 2.0), dim=-1)
        with _autocast(device, precision):
            out = forward(x)
            terms = losses.dho_loss(out["ce_logits"][:batch], out["kd_logits"][:batch], y, p[:batch],
                                    out["kd_logits"][batch:], p[batch:], lambda_=0.5, eta=2.0)
        terms["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="resnet-tiny")
    ap.add_argument("--teacher", default="ViT-S-32", help="open_clip model name or config JSON (random init)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=32, help="B labeled + B unlabeled per step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--image-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"),
                    help="JPEG size; 500x375 is ImageNet's typical photo")
    ap.add_argument("--noise", type=float, default=16.0, help="grain std of the synthetic JPEGs (decode cost)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--views", type=int, default=2, help="teacher views per image in the caches")
    ap.add_argument("--teacher-batch-size", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="distill --compile, and the student-only step compiled too")
    ap.add_argument("--decode", default="cpu", choices=["cpu", "gpu"], help="distill --decode: JPEGs decoded by the workers or on the GPU")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense peak at this precision, for MFU")
    ap.add_argument("--results", type=Path, default=None, help="append a JSON line with the numbers here")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src, jpeg_kb = make_images(root / "images", args.images, args.classes, tuple(args.image_size), args.noise)
        full = data.prepare(src, root / "full", shard_size=max(args.batch_size, 64))
        labeled, _ = data.split(full, root / "labeled", percent=25, shard_size=max(args.batch_size // 2, 16))
        t0 = time.perf_counter()
        for ds, name in ((full, "full"), (labeled, "labeled")):
            precompute(ds.root, root / f"{name}.zarr", model=args.teacher, pretrained="none", views=args.views, device=args.device,
                       precision=args.precision, batch_size=args.teacher_batch_size, workers=args.workers, templates="simple")
        t_pre = time.perf_counter() - t0
        cfg = DistillConfig(
            labeled=str(labeled.root), labeled_cache=str(root / "labeled.zarr"), unlabeled=str(full.root),
            unlabeled_cache=str(root / "full.zarr"), student=args.student, out=str(root / "run"), method="dho",
            epochs=10_000, max_steps=args.steps, batch_size=args.batch_size, workers=args.workers, device=args.device,
            precision=args.precision, log_every=5, checkpoint_every=10**9, compile=args.compile, decode=args.decode,
        )
        steps_per_epoch = args.images // args.batch_size
        if steps_per_epoch <= args.steps:
            print(f"note: {args.images} images make {steps_per_epoch} steps per epoch; the checkpoint saved at each epoch's "
                  f"end falls inside the measurement (real epochs are thousands of steps): use --images > steps x batch")
        distill(cfg)
        records = [m for m in map(json.loads, (root / "run" / "metrics.jsonl").read_text().splitlines()) if "samples_per_s" in m]
        # steady state: drop the intervals up to step max(10, steps / 4), which hold the workers' start-up
        rates = [m["samples_per_s"] for m in records if m["step"] > max(10, args.steps // 4)]
        r_distill = float(np.mean(rates))

    student = build_student(args.student, args.classes, classnames=[f"class {i}" for i in range(args.classes)]).to(device)
    r_student = step_rate(student, device, args.precision, args.batch_size, args.classes, args.steps, compile=args.compile)
    from dho.inference_bench import count_flops

    size = student.preprocess.image_size
    student.eval()  # one image: BatchNorm in eval mode (the FLOPs are the same)
    step_flops = 3 * count_flops(student, torch.randn(1, 3, size, size, device=device))  # forward + backward ~ 3x forward
    teacher = load_teacher(args.teacher, "none", device=args.device, precision=args.precision,
                           classnames=[f"class {i}" for i in range(args.classes)], templates="simple")
    r_online = step_rate(student, device, args.precision, args.batch_size, args.classes, max(args.steps // 4, 3), teacher=teacher)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result = {
        "device": name, "student": args.student, "teacher": args.teacher, "precision": args.precision,
        "batch": f"{args.batch_size}+{args.batch_size}", "workers": args.workers,
        "jpeg": f"{args.image_size[0]}x{args.image_size[1]}, {jpeg_kb:.0f} KB",
        "distill_samples_per_s": round(r_distill, 1), "student_only_samples_per_s": round(r_student, 1),
        "online_teacher_samples_per_s": round(r_online, 1),
        "data_path_efficiency": round(r_distill / r_student, 3), "cache_speedup": round(r_distill / r_online, 2),
        "distill_interval_rates": [round(r) for r in rates],
        "images": args.images, "views": args.views, "precompute_seconds": round(t_pre, 1), "compile": args.compile, "decode": args.decode,
        "student_step_tflops": round(step_flops * r_student / 1e12, 3),
    }
    if args.peak_tflops:
        result["student_step_mfu"] = round(result["student_step_tflops"] / args.peak_tflops, 3)
    print(json.dumps(result, indent=2))
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
