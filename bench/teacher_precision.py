"""How far the teacher's cached probabilities move with the autocast precision, against fp32.

    python bench/teacher_precision.py [--model ViT-H-14-378-quickgelu --pretrained none --device cuda]
        [--images 256 --classes 1000 --eta 2 --results OUT.jsonl]
    python bench/teacher_precision.py --model pipelines/demo/demo-clip.json --pretrained demo_out/teacher.pt \
        --templates pipelines/demo/digits-templates.txt --data demo_out/seed-0/datasets/test --device cpu

The same images (the evaluation view of `--data`, or smooth random photo-like images) go through
the teacher once per precision; per sample the stored quantity p = softmax(f_X(x) . w_c / (zeta * eta))
is compared with fp32's: max and mean |dp|, and top-1 agreement. The teacher runs once per
cache, so this error is what every student inherits (docs/fidelity.md, "teacher precision").
Random-init weights (`--pretrained none`) give the arithmetic's error, not a trained model's
class margins; pass real weights where they exist. Not a test: a measurement for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dho import data  # noqa: E402
from dho.devices import resolve_device  # noqa: E402
from dho.teacher import load_teacher  # noqa: E402


def images_of(args, preprocess: data.Preprocessing) -> torch.Tensor:
    """(N, 3, S, S) normalised evaluation views of the dataset, or of generated smooth random images."""
    size, mean, std = preprocess.image_size, preprocess.mean, preprocess.std
    views = []
    if args.data:
        ds = data.Dataset.open(args.data)
        for s in range(len(ds.shards)):
            for sample in data.iter_shard(ds, s):
                view = data.eval_view_uint8(sample.image, size, preprocess.interpolation, preprocess.resize_mode)
                views.append(data.normalize(view, mean, std))
                if len(views) == args.images:
                    return torch.stack(views)
        return torch.stack(views)
    g = torch.Generator().manual_seed(0)
    low = torch.rand(args.images, 3, 8, 8, generator=g)  # smooth, photo-like: upsampled coarse noise
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-H-14-378-quickgelu")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--templates", default="simple")
    ap.add_argument("--data", default=None, help="a dho dataset whose evaluation views to use (default: generated images)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--classes", type=int, default=1000, help="class names 'class i' when --data is not given")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--zeta", type=float, default=0.01)
    ap.add_argument("--eta", type=float, default=2.0)
    ap.add_argument("--results", default=None, help="append one JSON line per precision here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    classnames = data.Dataset.open(args.data).classnames if args.data else [f"class {i}" for i in range(args.classes)]
    precisions = ["fp32", "fp16", "bf16"]
    probs, rows = {}, []
    for precision in precisions:
        teacher = load_teacher(args.model, args.pretrained, device, precision, classnames=classnames,
                               templates=args.templates, verbose=False)
        x = images_of(args, teacher.preprocess)
        out = []
        for i in range(0, len(x), args.batch_size):
            emb = teacher.encode_images(x[i:i + args.batch_size])  # (b, D)
            out.append(torch.softmax(teacher.logits(emb, args.zeta) / args.eta, dim=-1).cpu())
        probs[precision] = torch.cat(out).double()  # (N, C)
        del teacher
    ref = probs["fp32"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"teacher {args.model} ({args.pretrained}) on {name}, {len(ref)} images, {ref.shape[1]} classes, eta {args.eta}")
    for precision in precisions[1:]:
        diff = (probs[precision] - ref).abs()
        row = {"device": name, "model": args.model, "pretrained": args.pretrained, "precision": precision,
               "images": len(ref), "classes": ref.shape[1], "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
               "max_abs_top1_prob": float((probs[precision].max(1).values - ref.max(1).values).abs().max()),
               "top1_agreement": float((probs[precision].argmax(1) == ref.argmax(1)).double().mean())}
        rows.append(row)
        print(f"  {precision} vs fp32: max |dp| {row['max_abs']:.2e}, mean |dp| {row['mean_abs']:.2e}, "
              f"max |d top-1 p| {row['max_abs_top1_prob']:.2e}, top-1 agreement {100 * row['top1_agreement']:.2f}%")
    if args.results:
        with open(args.results, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
