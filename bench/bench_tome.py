"""GMACs (and optionally images/s) of a ViT student with ToMe at several r, as Table 9 lists them.

    python bench/bench_tome.py                                  # CLIP ViT-B/16, 1000 classes: GMACs at r = 0, 8
    python bench/bench_tome.py --r 0 8 12 16 --time --device cuda --precision fp16 --batch-size 256

The student is built with random weights (FLOPs and speed do not depend on them), served as `dho bench-inference`
serves it (both heads + Eq. 11), ToMe applied by `dho.tome.apply_tome`; FLOPs from `bench-inference`'s counter.
Accuracy needs a trained run: `dho bench-inference RUN --tome-r 8 --data VAL`.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from dho.devices import resolve_device
from dho.inference_bench import ServedStudent, _autocast, count_flops, images_per_second
from dho.students import build_student
from dho.tome import apply_tome


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="ViT-B-16", help="open_clip model name or timm/ARCH of a ViT")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--r", type=int, nargs="+", default=[0, 8])
    p.add_argument("--time", action="store_true", help="also time images/s")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()

    kw = {} if args.student.startswith("timm/") else {"init_heads_from_text": False}
    student = build_student(args.student, args.classes, **kw).eval()
    size = student.preprocess.image_size
    device = resolve_device(args.device)
    rows = []
    for r in args.r:
        merged = copy.deepcopy(student)
        info = apply_tome(merged, r)
        served = ServedStudent(merged, 0.5, 0.5).eval()
        row = {"r": r, "params_m": sum(q.numel() for q in served.parameters()) / 1e6,
               "gmacs": count_flops(served, torch.zeros(1, 3, size, size)) / 2e9,
               "tokens_per_block": info["tokens_per_block"], "tokens_out": info["tokens_out"]}
        if args.time:
            served.to(device)
            x = torch.randn(args.batch_size, 3, size, size, device=device)
            with _autocast(device, args.precision):
                row["images_per_s"] = images_per_second(served, x, warmup=5, iters=10, min_seconds=args.seconds)
            served.cpu()
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["gmacs_pct"] = 100 * (row["gmacs"] / base["gmacs"] - 1)
        if "images_per_s" in row:
            row["images_per_s_pct"] = 100 * (row["images_per_s"] / base["images_per_s"] - 1)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
