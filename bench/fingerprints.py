"""Fingerprints of fixed tiny commands: the teacher caches and trained weights they write, as sha256 lines.

    python bench/fingerprints.py --out /tmp/fp-before     # on one machine, before a change
    python bench/fingerprints.py --out /tmp/fp-after      # ... and after it
    diff /tmp/fp-before/fingerprints.txt /tmp/fp-after/fingerprints.txt   # no output: bit-identical

A change that only moves code (a refactor) must leave every line equal on the same machine. Floats
differ between CPUs, so the lines of two machines are not comparable. The commands go through the
public Python API only (`dho.data`, `dho.precompute`, `dho.distill`, `dho.tip_adapter`), so the same
script runs on both sides of a refactor. They cover every training method and the options that take
their own path through the loop: top-k (sparse) and re-tempered caches, exclude-labeled, every
schedule, accumulation, gradient clipping, random views, separate forwards, validation every epoch,
selection of the best epoch, gradient diagnostics, DataLoader workers, a VLM student with text init,
a resumed run, and Tip-Adapter-F's adapter and cache.

Each line: `name  sha256` where a cache's hash covers every file of the store (chunks and array
metadata) and its attributes without `created_at`; a run's covers model.pt's state_dict tensors and
meta (the checkout's own path written as <repo>, so two checkouts compare), the logged loss terms and
learning rates (not the timings), alpha_beta.json and the checkpoint's step. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny image folders and tiny open_clip config

TINY_CLIP = ROOT / "tests" / "assets" / "tiny-clip.json"
RUN_KEYS_SKIPPED = ("samples_per_s", "data_wait_s", "peak_memory_gib")  # wall-clock and device figures


def cache_hash(path: Path) -> str:
    """sha256 over every file of a Zarr store (path + bytes), the root attributes without created_at."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        raw = f.read_bytes()
        if rel == "zarr.json":
            meta = json.loads(raw)
            meta.get("attributes", {}).pop("created_at", None)
            raw = json.dumps(meta, sort_keys=True).encode()
        h.update(rel.encode() + b"\0" + hashlib.sha256(raw).digest())
    return h.hexdigest()


def run_hash(run: Path) -> str:
    """sha256 over a run's model.pt (tensors + meta), metrics (loss terms, lr, validation) and alpha_beta.json."""
    import torch

    h = hashlib.sha256()
    payload = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    for name, t in sorted(payload.pop("state_dict").items()):
        t = t.contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    payload.pop("dho_version", None)
    # the student's name can be a path inside the checkout (tests/assets/tiny-clip.json): compare checkouts
    h.update(json.dumps(payload, sort_keys=True, default=str).replace(str(ROOT), "<repo>").encode())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items() if k not in RUN_KEYS_SKIPPED}
        h.update(json.dumps(record, sort_keys=True).encode())
    if (run / "alpha_beta.json").is_file():
        stored = json.loads((run / "alpha_beta.json").read_text())
        stored.pop("search_on", None)  # an absolute path of this run's folder
        h.update(json.dumps(stored, sort_keys=True).encode())
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    h.update(str(ckpt["step"]).encode())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (replaced); fingerprints.txt is written there")
    args = parser.parse_args()
    import torch

    from dho import data
    from dho import tip_adapter as tip
    from dho.distill import DistillConfig, distill
    from dho.precompute import precompute
    from helpers_data import make_image_folder

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines: list[str] = []

    def record(name: str, digest: str) -> None:
        lines.append(f"{name:<28} {digest}")
        print(lines[-1], flush=True)

    # ---- data and a tiny random-init open_clip teacher (seeded: the same file on every run)
    import open_clip

    open_clip.add_model_config(TINY_CLIP)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.save(open_clip.create_model(TINY_CLIP.stem, pretrained=None).state_dict(), out / "teacher.pt")
    src = make_image_folder(out / "images", num_classes=4, per_class=10)
    full = data.prepare(src, out / "full", shard_size=8)
    labeled, _ = data.split(full, out / "labeled", shots=2, seed=0, val_per_class=2, val_out=out / "val", shard_size=4)
    teacher = dict(model=str(TINY_CLIP), pretrained=str(out / "teacher.pt"), views=2, device="cpu", batch_size=16)

    # ---- stage 1: caches
    precompute(full.root, out / "full.zarr", store_embeddings=True, workers=0, **teacher)
    precompute(labeled.root, out / "labeled.zarr", store_embeddings=True, center_view=True, workers=2, **teacher)
    precompute(out / "val", out / "val.zarr", store_embeddings=True, center_view=True, workers=0, **teacher)
    precompute(full.root, out / "full-top2.zarr", topk=2, workers=0, eta=1.0, **teacher)
    precompute(labeled.root, out / "labeled-top2.zarr", topk=2, workers=0, eta=1.0, **teacher)
    precompute(full.root, out / "full-eta1.zarr", workers=0, eta=1.0, templates="simple", **teacher)
    precompute(labeled.root, out / "labeled-eta1.zarr", workers=0, eta=1.0, templates="simple", **teacher)
    for name in ("full", "labeled", "val", "full-top2", "labeled-top2", "full-eta1", "labeled-eta1"):
        record(f"cache {name}", cache_hash(out / f"{name}.zarr"))

    # ---- stage 2: runs
    base = dict(labeled=str(out / "labeled"), labeled_cache=str(out / "labeled.zarr"), unlabeled=str(out / "full"),
                unlabeled_cache=str(out / "full.zarr"), student="resnet-tiny", epochs=3, batch_size=8, lr=3e-3,
                workers=0, device="cpu", log_every=1, seed=0)
    val = str(out / "val")
    runs = {
        "dho": dict(val=val, eval_every_epoch=True, log_grad_cosine=2),
        "ce": dict(method="ce"),
        "kd": dict(method="kd"),
        "ce+kd": dict(method="ce+kd", log_grad_cosine=3),
        "ce+kd-feature": dict(method="ce+kd-feature"),
        "dho-topk": dict(labeled_cache=str(out / "labeled-top2.zarr"), unlabeled_cache=str(out / "full-top2.zarr"), eta=2.0),
        "dho-retemper": dict(labeled_cache=str(out / "labeled-eta1.zarr"), unlabeled_cache=str(out / "full-eta1.zarr")),
        "dho-reference": dict(lr_schedule="reference", warmup_steps=3, unlabeled_pool="exclude-labeled",
                              interpolation="bicubic"),
        "dho-ten-dataset": dict(epoch="shorter", forward="separate", lr_schedule="linear", warmup_fraction=0.1,
                                val=val, select_best_on_val=True, unlabeled_pool="exclude-labeled"),
        "ce+kd-best": dict(method="ce+kd", epoch="shorter", val=val, select_best_on_val=True),
        "dho-accum-clip-random": dict(accum_steps=2, grad_clip=1.0, view_sampling="random", weight_decay=0.05),
        "dho-workers": dict(workers=2, checkpoint_every=4, keep_checkpoints=2),
        "dho-clip": dict(student=str(TINY_CLIP), epochs=1, lr=1e-3),
        "dho-clip-eq10": dict(student=str(TINY_CLIP), epochs=1, lr=1e-3, vlm_heads="eq10", alpha=0.3, beta=1.5),
    }
    for name, options in runs.items():
        run = out / "runs" / name
        cfg = DistillConfig(**{**base, "out": str(run), **options})
        distill(cfg)
        record(f"run {name}", run_hash(run))
    # a run stopped by --max-steps, then resumed to its end
    run = out / "runs" / "dho-resumed"
    distill(DistillConfig(**{**base, "out": str(run), "max_steps": 7, "checkpoint_every": 3}))
    distill(DistillConfig(**{**base, "out": str(run), "checkpoint_every": 3}), resume=True)
    record("run dho-resumed", run_hash(run))

    # ---- Tip-Adapter-F: adapter and its cache
    adapter = tip.build(out / "labeled", out / "labeled.zarr", out / "val", out / "val.zarr", epochs=3, device="cpu",
                        log=lambda m: None)
    payload = {k: v for k, v in adapter.items() if k not in ("dho_version", "labeled", "val")}
    h = hashlib.sha256()
    for k, v in sorted(payload.items()):
        h.update(k.encode() + (v.contiguous().view(torch.uint8).numpy().tobytes() if torch.is_tensor(v)
                               else json.dumps(v, sort_keys=True).encode()))
    record("tip-adapter", h.hexdigest())
    tip.save(adapter, out / "tip.pt")
    tip.apply(out / "tip.pt", out / "full", out / "full.zarr", out / "full-tipf.zarr", device="cpu", log=lambda m: None)
    tipf = out / "full-tipf.zarr"
    meta = json.loads((tipf / "zarr.json").read_text())
    meta["attributes"]["teacher"].pop("weights_sha256")  # the adapter file's bytes (it holds dho_version and paths)
    (tipf / "zarr.json").write_text(json.dumps(meta))
    record("cache full-tipf", cache_hash(tipf))

    (out / "fingerprints.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'fingerprints.txt'}")


if __name__ == "__main__":
    main()
