"""Teacher forward speed, eager against torch.compile, as ratios and model-FLOP utilisation (never asserted in tests).

    python bench/bench_teacher.py [--model ViT-S-32 --device cpu --batch-size 16 --iters 5]
    python bench/bench_teacher.py --model ViT-H-14-378-quickgelu --device cuda --precision fp16 --batch-size 128 \
        --peak-tflops 989 --results OUT/teacher.jsonl          # on an H100/H200 (dense bf16/fp16 peak ~989 TFLOP/s)

The teacher is built by `dho.teacher.load_teacher` (random weights: speed does not depend on them) and run
through `Teacher.encode_images`, what `dho precompute-teacher` runs per batch, eager and with `compile=True`
(`--compile` of precompute-teacher); in bf16/fp16 also with fp32 weights under autocast (`cast_weights=False`,
the path before the weights were cast). FLOPs per image come from torch's flop counter
(`dho.inference_bench.count_flops`, multiply-add = 2); TFLOP/s = FLOPs x images/s; MFU = TFLOP/s / --peak-tflops.
Prints one JSON object (and appends it to --results).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dho.inference_bench import count_flops  # noqa: E402
from dho.teacher import load_teacher  # noqa: E402


def rate(teacher, x: torch.Tensor, warmup: int, iters: int) -> float:
    """Images/s of teacher.encode_images on the batch x (after `warmup` calls, which include compilation)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        teacher.encode_images(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        teacher.encode_images(x)
    sync()
    return iters * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-S-32", help="open_clip model name or config JSON (random init)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense peak at this precision, for MFU")
    ap.add_argument("--results", type=Path, default=None, help="append a JSON line with the numbers here")
    args = ap.parse_args()
    device = torch.device(args.device)
    names = [f"class {i}" for i in range(10)]
    out = {}
    modes = ("autocast", "eager", "compiled") if args.precision != "fp32" else ("eager", "compiled")
    for mode in modes:  # autocast: fp32 weights under autocast (dho <= 0.1); eager: weights cast (the default); compiled
        t0 = time.perf_counter()
        teacher = load_teacher(args.model, "none", device=device, precision=args.precision, classnames=names,
                               templates="simple", verbose=False, compile=mode == "compiled",
                               cast_weights=mode != "autocast")
        size = teacher.preprocess.image_size
        x = torch.randn(args.batch_size, 3, size, size, device=device)
        out[mode] = {"images_per_s": round(rate(teacher, x, args.warmup, args.iters), 2),
                     "build_and_warmup_s": round(time.perf_counter() - t0, 1)}
        if mode == modes[0]:  # fp32 weights in this first mode; FLOPs do not depend on the dtype
            flops = count_flops(teacher.model.visual, x[:1])
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "model": args.model, "precision": args.precision, "batch": args.batch_size, "gflops_per_image": round(flops / 1e9, 3),
        **{f"{m}_images_per_s": v["images_per_s"] for m, v in out.items()},
        **{f"{m}_tflops": round(flops * v["images_per_s"] / 1e12, 3) for m, v in out.items()},
        "compiled_over_eager": round(out["compiled"]["images_per_s"] / out["eager"]["images_per_s"], 3),
        **({"cast_over_autocast": round(out["eager"]["images_per_s"] / out["autocast"]["images_per_s"], 3)} if "autocast" in out else {}),
        "compile_and_warmup_s": out["compiled"]["build_and_warmup_s"],
    }
    if args.peak_tflops:
        for m in out:
            result[f"{m}_mfu"] = round(result[f"{m}_tflops"] / args.peak_tflops, 3)
    print(json.dumps(result, indent=2))
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
