"""Speed-up of the data commands' process pools: `prepare`, `index` and `split` with one process per core
over the same command in one process (`processes=1`), on a generated ImageFolder tree.

    python bench/bench_data.py [--images 3000 --size 500x375 --shard-size 250 --percent 10 --repeats 3 --processes N]

Each command runs `--repeats` times per setting, alternating, into fresh folders, and the fastest run
counts (the dev box is shared); the outputs (manifests and every shard) must be byte-identical, else
the script fails. Images are photo-sized JPEGs (smooth colour fields plus grain, ~ImageNet's
500x375 and bytes per image). `split --percent P` reads every source shard and writes P% of the
bytes again: the pool reads in parallel, the main process writes what the workers send it. Timings
are ratios within one run on one machine; never asserted in tests.

Also printed, for the pooled run: the CPU seconds of the main process (reading results, writing and
hashing shards: the part that does not spread) and of the pool's processes (the part that does). On
a busy machine the wall-clock ratio says little; (main + pool) / max(main, pool / P) bounds the
speed-up on P free cores.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dho import data
from dho.data.pool import pool_size


def make_images(src: Path, images: int, classes: int, size: tuple[int, int]) -> int:
    """`images` JPEGs in `classes` folders; returns their total bytes."""
    rng = np.random.default_rng(0)
    total = 0
    for i in range(images):
        folder = src / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 255, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BICUBIC), dtype=np.int16)  # (H, W, 3)
        grain = rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        (folder / f"img_{i:05d}.jpg").write_bytes(buf.getvalue())
        total += len(buf.getvalue())
    return total


def folder_bytes(folder: Path) -> dict:
    """Every file's bytes; the manifest's without its provenance (a split names its source folder)."""
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    files[data.MANIFEST] = {k: v for k, v in data.Dataset.open(folder).manifest.items() if k != "provenance"}
    return files


def timed(fn) -> tuple[float, float, float]:
    """(wall s, CPU s of this process, CPU s of the pool's processes) of fn()."""
    def clocks():
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # pool processes count once joined
        return time.perf_counter(), time.process_time(), children.ru_utime + children.ru_stime

    start = clocks()
    fn()
    return tuple(b - a for a, b in zip(start, clocks()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--percent", type=float, default=10.0, help="split --percent")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=None, help="pool size (default: one per core)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    cores = pool_size(1 << 30, args.processes)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        total = make_images(tmp / "images", args.images, args.classes, size)
        (tmp / "classes.txt").write_text("".join(f"class_{c:03d}\n" for c in range(args.classes)))
        print(f"{args.images} JPEGs of {size[0]}x{size[1]}, {total / args.images / 1e3:.0f} kB each; "
              f"shards of {args.shard_size}; pool of {cores} processes; load average {os.getloadavg()[0]:.1f}")
        inf = (float("inf"),) * 3
        best = {"pool": [inf] * 3, "one": [inf] * 3}  # prepare, index, split: the fastest run's (wall, main, pool)
        for _ in range(args.repeats):
            for tag, processes in (("pool", args.processes), ("one", 1)):
                out = tmp / tag
                t_prepare = timed(lambda: data.prepare(tmp / "images", out / "prepared", shard_size=args.shard_size,
                                                       processes=processes, overwrite=True))
                shards = [str(p) for p in sorted((out / "prepared").glob("*.tar"))]
                t_index = timed(lambda: data.index(shards, tmp / "classes.txt", out / "indexed", processes=processes,
                                                   overwrite=True))
                t_split = timed(lambda: data.split(out / "prepared", out / "part", percent=args.percent,
                                                   shard_size=args.shard_size, processes=processes, overwrite=True))
                best[tag] = [min(a, b) for a, b in zip(best[tag], (t_prepare, t_index, t_split))]  # by wall time
        for name in ("prepared", "part"):
            if folder_bytes(tmp / "pool" / name) != folder_bytes(tmp / "one" / name):
                sys.exit(f"{name}: the pooled output differs from the one-process output")
        indexed = [[{k: v for k, v in s.items() if k != "path"} for s in data.Dataset.open(tmp / tag / "indexed").manifest["shards"]]
                   for tag in ("pool", "one")]
        if indexed[0] != indexed[1]:
            sys.exit("indexed: the pooled manifest differs from the one-process manifest")
        print("| command | one process s | pool s | speed-up | pool run: main CPU s | pool run: workers CPU s |\n"
              "|---|---|---|---|---|---|")
        for i, command in enumerate(("prepare", "index", f"split --percent {args.percent:g}")):
            one, (pool, main_cpu, pool_cpu) = best["one"][i][0], best["pool"][i]
            print(f"| {command} | {one:.2f} | {pool:.2f} | {one / pool:.2f}x | {main_cpu:.2f} | {pool_cpu:.2f} |")
        print("outputs byte-identical: yes")


if __name__ == "__main__":
    main()
