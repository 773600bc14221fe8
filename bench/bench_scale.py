"""Scale of the data path against the number of samples N, projected to ImageNet-21k (issue 13).

    python bench/bench_scale.py [--sizes 10000 100000 1000000 --classes 1000 --workers 2 --out scale.md --json scale.json]
    python bench/bench_scale.py --quick        # two tiny N in seconds: what tests/test_bench_scale.py runs
    python bench/bench_scale.py --cache-info [--before] --sizes 100000 300000 1000000 --classes 21841
                                               # only `dho cache-info`'s time against N, and its exponent

For each N the bench builds a dataset and its teacher caches with dho's own entry points, then measures:
- dataset: webdataset tar shards of `--shard-size` samples (one 8x8 JPEG reused, a random label of C
  classes, ImageNet-like keys), `manifest.json` by the real `dho index` in a fresh process (index s, and
  index peak MB: its main process's peak RSS, imports included) and a labeled split by
  `data.split --keys` with a keys file of 10% of the keys (split s);
- cache: a top-k teacher cache for the whole set and one for the split, created with
  `TeacherCache.create_or_open` and filled unit by unit through the real writer (`write_valid`,
  `write_unit`, `finalize`) with synthetic teacher outputs; files in the store and its size;
- open: `Dataset.open` + `TeacherCache.open(dataset=...)` + completeness (`is_complete`, `valid`) in a
  fresh process, imports not counted;
- open streams: distill's data set-up (`open_streams`: both datasets and caches opened and checked, the
  union check, the exclude-labeled pool) in a fresh process, and a resume's seek 90% into a pass;
- launch: the real `dho distill` CLI (resnet-tiny, split = labeled, whole set = unlabeled, 1 step,
  `--workers W`) in a subprocess: seconds from process start to its first line of output after set-up
  (imports, datasets and caches opened, student built) and to its first metrics line (the first step);
- memory: peak RSS / PSS / USS (from /proc/PID/smaps_rollup, polled) of that run's main process and of
  each DataLoader worker. USS = Private_Clean + Private_Dirty: under fork, a worker's USS is what it
  really adds; its PSS also counts a share of the pages it still shares with the main process.
Every metric is then fitted over the sizes measured with a power law m = a * N^b (least squares on
log m vs log N) and with a fixed plus per-sample cost m = a + c * N, and both are projected to N = 14M
(ImageNet-21k: 14.2M images, 21,841 classes) and 100M, beside the issue's targets; the exponents of
launch, data set-up, seek and index memory are checked against b <= 1.05 (issue 28). The two part ways
for metrics with a large fixed cost (see `project`); measure up to 1M before trusting either.
Timings are of this machine.

Out of scope: real image bytes (times that grow with bytes read, index's hashing and split's copy of
the labeled images, are for tiny images here), a cold page cache (dropping it needs root), the teacher
(the cache holds random top-k outputs) and training speed (see bench_distill.py). The dataset and
cache formats are known only by `write_shards` and `write_cache`: adapt those two for a new format.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dho import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROJECT_TO = {"14M (ImageNet-21k)": 14_197_122, "100M": 100_000_000}
LABELED_FRACTION = 0.1  # the split's keys file: 10% of the keys (1.4M lines at ImageNet-21k)
# the targets: (metric, at most, what it stands for)
TARGETS = {
    "worker_uss_mb": (50, "extra memory per DataLoader worker, independent of N"),
    "open_s": (2, "cache open + completeness check"),
    "first_step_s": (60, "distill launch to first step"),
    "cache_files": (50_000, "files in the cache store"),
    "split_s": (30, "split --keys with the 10% keys file (1.4M lines at 14M)"),
}
# issue 28: what may grow at most about linearly with N (fitted exponent b of a N^b over the sizes measured)
EXPONENT_TARGETS = {
    "first_step_s": (1.05, "distill launch to first step"),
    "streams_s": (1.05, "distill's data set-up: union check, exclude-labeled pool"),
    "seek_s": (1.05, "resume: seeking 90% into a pass"),
    "index_peak_mb": (1.05, "dho index peak memory"),
}
# (key, column header) of the report, in order; every column but the first two is fitted and projected
COLUMNS = [
    ("n", "N"), ("shards", "shards"), ("write_s", "write shards s"), ("index_s", "index s"), ("index_peak_mb", "index peak MB"),
    ("split_s", "split s"), ("cache_write_s", "cache write s"), ("cache_files", "cache files"), ("cache_mb", "cache MB"),
    ("open_s", "open s"), ("streams_s", "open streams s"), ("seek_s", "resume seek s"),
    ("setup_s", "launch to set-up s"), ("first_step_s", "launch to step 1 s"), ("main_rss_mb", "main RSS MB"),
    ("main_pss_mb", "main PSS MB"), ("worker_pss_mb", "worker PSS MB"), ("worker_uss_mb", "worker USS MB"),
]  # the JSON also has main_uss_mb: not in the table, as it swings with the pages the workers share while they live


# ---------------------------------------------------------------------------------- generation


def tiny_jpeg() -> bytes:
    """One 8x8 JPEG, reused for every sample: the bench measures per-sample overheads, not image bytes."""
    pixels = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, num_samples: int, shard_size: int, num_classes: int, seed: int) -> list[Path]:
    """Webdataset tar shards: per sample `KEY.cls` (ASCII label) then `KEY.jpg`, in sorted order as webdataset's
    TarWriter writes them; keys look like ImageNet's (`n00000042/n00000042_1234567`), since their length is memory."""
    image = tiny_jpeg()
    labels = np.random.default_rng(seed).integers(0, num_classes, num_samples)  # (N,)
    folder.mkdir(parents=True)
    paths = []
    for first in range(0, num_samples, shard_size):
        path = folder / f"shard-{first // shard_size:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(first, min(first + shard_size, num_samples)):
                key = f"n{labels[i]:08d}/n{labels[i]:08d}_{i}"
                for ext, payload in (("cls", str(labels[i]).encode("ascii")), ("jpg", image)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode = len(payload), 0o644
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def write_cache(ds: data.Dataset, path: Path, views: int, topk: int, embed_dim: int, seed: int) -> None:
    """A complete top-k teacher cache of `ds` written through the real writer, one (view, shard) unit at a time,
    with synthetic teacher outputs: K distinct classes per row, probabilities descending and summing to < 1,
    crop boxes inside the 8x8 image. The attributes are those precompute gives (cache_schemas/v4.json; the
    writer adds shard_group)."""
    from dho.cache import TeacherCache
    from dho.cache_layout import chunk_length

    counts = [s.count for s in ds.shards]
    attrs = {
        "dataset_fingerprint": ds.fingerprint, "num_samples": ds.num_samples, "classnames": list(ds.classnames),
        "num_views": views, "center_view": False, "seed": seed, "zeta": 0.01, "eta": 2.0,
        "teacher": {"model": "synthetic", "pretrained": "none", "weights_sha256": "0" * 64, "model_config_sha256": "0" * 64,
                    "prompt_names": "underscores-to-spaces"},
        "templates": ["a photo of a {}."], "text_classifier_norm": "renormalize",
        "preprocess": {"image_size": 224, "interpolation": "bicubic", "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711], "resize_mode": "shortest", "source": "bench_scale"},
        "precision": "fp32", "topk": topk, "store_embeddings": False, "embed_dim": embed_dim,
        "shard_counts": counts, "chunk_len": chunk_length(counts),
    }
    rng = np.random.default_rng(seed)
    c = ds.num_classes
    classifier = rng.standard_normal((c, embed_dim)).astype(np.float32)  # (C, D)
    classifier /= np.linalg.norm(classifier, axis=1, keepdims=True)
    cache = TeacherCache.create_or_open(path, attrs, ds.keys, ds.labels, classifier, dataset=ds)
    for s, n in enumerate(counts):
        cache.write_valid(s, np.ones(n, dtype=bool))
        for v in range(views):
            indices = (rng.integers(0, c, n)[:, None] + np.arange(topk)) % c  # (n, K) K distinct classes
            mass = rng.random((n, topk + 1))
            probs = -np.sort(-(mass / mass.sum(axis=1, keepdims=True))[:, :topk], axis=1)  # (n, K), sum < 1
            corner = rng.integers(0, 3, (n, 2))
            params = np.concatenate([corner, np.full((n, 2), 6), rng.integers(0, 2, (n, 1))], axis=1)  # (n, 5) 6x6 box
            cache.write_unit(v, s, view_params=params, topk_indices=indices, topk_probs=probs)
    if not cache.finalize():
        raise RuntimeError(f"{path}: not complete after writing every unit")


def layout_files(n: int, shard_size: int, views: int, topk: int) -> int:
    """Files of a complete top-k cache (no embeddings) of N samples in `shard_size`-sample shards under the
    current schema's layout (the writer's own rule for G): no fit needed to project the file count."""
    from dho.cache_layout import row_bytes, shard_group

    counts = [shard_size] * (n // shard_size) + ([n % shard_size] if n % shard_size else [])
    chunk_len = shard_size if len(counts) > 1 else counts[0]
    g = shard_group(counts, chunk_len, row_bytes({"classnames": [""] * (topk + 1), "topk": topk, "store_embeddings": False}))
    groups = -(-len(counts) // g)
    per_view = 3  # topk_indices, topk_probs, view_params: one Zarr shard file per (view, group)
    arrays = per_view + 5  # + keys, labels, valid, text_classifier, done
    return per_view * views * groups + 4 * groups + 1 + arrays + 1  # + keys/labels/valid/done chunks, classifier, zarr.json


def store_stats(path: Path) -> tuple[int, int]:
    """(files, bytes) under `path`."""
    files = size = 0
    for folder, _, names in os.walk(path):
        files += len(names)
        size += sum(os.stat(os.path.join(folder, f)).st_size for f in names)
    return files, size


# ---------------------------------------------------------------------------------- measurements


def child_env() -> dict:
    """Subprocesses run this checkout's dho, whatever is installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")


OPEN_SCRIPT = """
import json, sys, time
from dho.data import Dataset
from dho.cache import TeacherCache
t0 = time.perf_counter()
ds = Dataset.open(sys.argv[1])
t1 = time.perf_counter()
cache = TeacherCache.open(sys.argv[2], dataset=ds)
t2 = time.perf_counter()
complete, valid = cache.is_complete(), int(cache.valid.sum())
t3 = time.perf_counter()
print(json.dumps({"dataset_s": t1 - t0, "cache_s": t2 - t1, "check_s": t3 - t2, "complete": complete, "valid": valid}))
"""


def open_time(ds_path: Path, cache_path: Path) -> dict:
    """Seconds of Dataset.open, TeacherCache.open(dataset=...) and the completeness check in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", OPEN_SCRIPT, str(ds_path), str(cache_path)], env=child_env(),
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"opening {cache_path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


INDEX_SCRIPT = """
import json, resource, sys, time
from dho import cli
def hwm():  # peak RSS of this address space in MB (VmHWM starts afresh at exec; ru_maxrss keeps the parent's)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
sys.argv = ["dho", "index", *sys.argv[1:]]
base = hwm()
t0, code = time.perf_counter(), 0
try:
    cli.main()
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "index_s": time.perf_counter() - t0, "base_mb": base, "peak_mb": hwm(),
                  "workers_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def index_run(shards: list[Path], classnames: Path, out: Path) -> dict:
    """The real `dho index` (its CLI entry, shards as a brace range) in a fresh process: seconds of the command
    (imports not counted) and the peak RSS of its main process (VmHWM; `base_mb` before the command ran,
    after the imports) and of its pool workers (`workers_peak_mb`, ru_maxrss: forked, they count shared pages)."""
    first, last = shards[0].stem.split("-")[1], shards[-1].stem.split("-")[1]
    pattern = str(shards[0].parent / f"shard-{{{first}..{last}}}.tar") if len(shards) > 1 else str(shards[0])
    proc = subprocess.run([sys.executable, "-c", INDEX_SCRIPT, pattern, "--classnames", str(classnames), "--out", str(out)],
                          env=child_env(), capture_output=True, text=True)
    result = json.loads(proc.stdout.splitlines()[-1]) if proc.stdout.strip() else {"code": proc.returncode}
    if result["code"] not in (0, None):
        raise RuntimeError(f"dho index exited with {result['code']}:\n{proc.stderr[-3000:]}")
    return {"index_s": result["index_s"], "index_peak_mb": result["peak_mb"], "index_base_mb": result["base_mb"],
            "index_workers_peak_mb": result["workers_peak_mb"]}


STREAMS_SCRIPT = """
import json, sys, time
from types import SimpleNamespace
import numpy as np
from dho.distill.objective import OBJECTIVES
from dho.distill.streams import open_streams
from dho.stream import consumer_records
labeled, labeled_cache, unlabeled, unlabeled_cache = sys.argv[1:5]
out = {}
for pool in ("union", "exclude-labeled"):
    cfg = SimpleNamespace(labeled=labeled, labeled_cache=labeled_cache, unlabeled=unlabeled, unlabeled_cache=unlabeled_cache,
                          unlabeled_pool=pool, method="dho", teacher="mean", decode="cpu")
    t0 = time.perf_counter()
    streams = open_streams(cfg, OBJECTIVES["dho"])
    out[pool] = time.perf_counter() - t0
    out[pool + "_size"] = streams.size_u
parts = streams.unlabeled
start = int(0.9 * streams.size_u) // 2  # 90% into the first pass of consumer 0 of 2: a resume late in an epoch
t0 = time.perf_counter()
records = consumer_records([[s.count for s in p.dataset.shards] for p in parts], [p.usable for p in parts], stream="u", seed=0,
                           consumer=0, num_consumers=2, window=2, valid_per_shard=[p.usable_per_shard for p in parts], start=start)
next(records)
out["seek"] = time.perf_counter() - t0
out["seek_records"] = start
print(json.dumps(out))
"""


def streams_time(labeled: Path, labeled_cache: Path, unlabeled: Path, unlabeled_cache: Path) -> dict:
    """In a fresh process (imports not counted): seconds of `distill`'s data set-up, `open_streams` (both datasets
    and caches opened and checked against each other, the unlabeled stream's usable samples), with
    --unlabeled-pool union and with exclude-labeled, and of a resume's seek 90% into a pass (`consumer_records`
    with `start`, to its first record) of one of two consumers."""
    proc = subprocess.run([sys.executable, "-c", STREAMS_SCRIPT, str(labeled), str(labeled_cache), str(unlabeled), str(unlabeled_cache)],
                          env=child_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"open_streams failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def memory(pid: int) -> dict | None:
    """RSS, PSS and USS (Private_Clean + Private_Dirty) of a process in MB, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    kb = {}
    for line in text.splitlines()[1:]:
        name, value = line.split(":", 1)
        kb[name] = int(value.split()[0])
    return {"rss": kb["Rss"] / 1024, "pss": kb["Pss"] / 1024, "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024}


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the DataLoader workers of a distill run), from /proc/*/stat."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the parenthesised command name
            out.append(int(entry.name))
    return out


def launch(run: Path, labeled: Path, labeled_cache: Path, unlabeled: Path, unlabeled_cache: Path, *, workers: int,
           batch_size: int, device: str, steps: int, poll_s: float = 0.05) -> dict:
    """`dho distill` in a subprocess: seconds from start to set-up done (its `dho distill: ...` line, printed once
    the data are open and the student is built) and to its first metrics line (step 1); peak memory of the main
    process and of each DataLoader worker, polled every `poll_s` until it exits."""
    cmd = [sys.executable, "-m", "dho", "distill", "--labeled", str(labeled), "--labeled-cache", str(labeled_cache),
           "--unlabeled", str(unlabeled), "--unlabeled-cache", str(unlabeled_cache), "--student", "resnet-tiny",
           "--out", str(run), "--epochs", "1", "--max-steps", str(steps), "--batch-size", str(batch_size),
           "--workers", str(workers), "--device", device, "--log-every", "1", "--checkpoint-every", "1000000"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter() - t0, ln) for ln in proc.stdout), daemon=True)
    reader.start()
    metrics = run / "metrics.jsonl"
    first_step = None
    peaks: dict[int, dict] = {}  # pid -> peak rss/pss/uss
    while proc.poll() is None:
        for pid in [proc.pid, *children(proc.pid)]:
            m = memory(pid)
            if m is not None:
                peak = peaks.setdefault(pid, m)
                peaks[pid] = {k: max(peak[k], m[k]) for k in m}
        if first_step is None and metrics.is_file() and metrics.stat().st_size > 0:
            first_step = time.perf_counter() - t0
        time.sleep(poll_s)
    reader.join()
    if proc.returncode:
        raise RuntimeError(f"dho distill exited with {proc.returncode}:\n" + "".join(ln for _, ln in lines[-40:]))
    if first_step is None:  # the whole run fell between two polls
        first_step = time.perf_counter() - t0
    workers_seen = [peaks[p] for p in peaks if p != proc.pid]
    if len(workers_seen) < workers:
        raise RuntimeError(f"saw {len(workers_seen)} of {workers} DataLoader workers; poll more often (--poll-s)")
    main = peaks[proc.pid]
    return {
        "setup_s": next(t for t, ln in lines if ln.startswith("dho distill:")), "first_step_s": first_step,
        "main_rss_mb": main["rss"], "main_pss_mb": main["pss"], "main_uss_mb": main["uss"],
        "worker_pss_mb": max(w["pss"] for w in workers_seen), "worker_uss_mb": max(w["uss"] for w in workers_seen),
        "worker_rss_mb": max(w["rss"] for w in workers_seen), "workers_seen": len(workers_seen),
    }


def measure(root: Path, n: int, args) -> dict:
    """Every metric for one N (data written under `root`)."""
    row: dict = {"n": n, "shards": math.ceil(n / args.shard_size)}
    t0 = time.perf_counter()
    shards = write_shards(root / "full", n, args.shard_size, args.classes, args.seed)
    row["write_s"] = time.perf_counter() - t0
    names = root / "classnames.txt"
    names.write_text("".join(f"class {c}\n" for c in range(args.classes)))
    row.update(index_run(shards, names, root / "full"))
    full = data.Dataset.open(root / "full")

    rng = np.random.default_rng(args.seed)
    keys_file = root / "labeled-keys.txt"
    picked = rng.choice(full.num_samples, size=max(1, round(LABELED_FRACTION * full.num_samples)), replace=False)
    keys_file.write_text("".join(full.keys[i] + "\n" for i in np.sort(picked)))
    t0 = time.perf_counter()
    labeled, _ = data.split(full, root / "labeled", keys_file=keys_file, shard_size=args.shard_size)
    row["split_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    write_cache(full, root / "full.zarr", args.views, args.topk, args.embed_dim, args.seed)
    row["cache_write_s"] = time.perf_counter() - t0
    files, size = store_stats(root / "full.zarr")
    row["cache_files"], row["cache_mb"] = files, size / 2**20
    row["cache_files_layout"] = layout_files(n, args.shard_size, args.views, args.topk)  # the rule the projection uses
    write_cache(labeled, root / "labeled.zarr", args.views, args.topk, args.embed_dim, args.seed)

    opened = open_time(root / "full", root / "full.zarr")
    if not opened["complete"] or opened["valid"] != n:
        raise RuntimeError(f"{root / 'full.zarr'}: complete={opened['complete']}, {opened['valid']} valid of {n}")
    row["open_s"] = opened["dataset_s"] + opened["cache_s"] + opened["check_s"]
    row["open_parts_s"] = {k: opened[k] for k in ("dataset_s", "cache_s", "check_s")}
    streams = streams_time(root / "labeled", root / "labeled.zarr", root / "full", root / "full.zarr")
    if streams["union_size"] != n or streams["exclude-labeled_size"] != n - labeled.num_samples:
        raise RuntimeError(f"open_streams: {streams['union_size']} (union), {streams['exclude-labeled_size']} (exclude-labeled) "
                           f"usable of {n}, {labeled.num_samples} labeled")
    row["streams_s"], row["seek_s"] = streams["union"] + streams["exclude-labeled"], streams["seek"]
    row["streams_parts_s"] = {k: streams[k] for k in ("union", "exclude-labeled")}
    row.update(launch(root / "run", root / "labeled", root / "labeled.zarr", root / "full", root / "full.zarr",
                      workers=args.workers, batch_size=args.batch_size, device=args.device, steps=args.steps,
                      poll_s=args.poll_s))
    return row


# ---------------------------------------------------------------------------------- projection and report


def fit_power_law(ns, values) -> tuple[float, float] | None:
    """(a, b) of values = a * N^b, least squares on log-log; None with fewer than 2 sizes or a value <= 0."""
    if len(ns) < 2 or min(values) <= 0:
        return None
    b, log_a = np.polyfit(np.log(ns), np.log(values), 1)
    return float(math.exp(log_a)), float(b)


def fit_affine(ns, values) -> tuple[float, float] | None:
    """(a, c) of values = a + c * N (a fixed cost plus a cost per sample), least squares with c >= 0 (a metric
    that does not grow, up to noise, is its mean); None with fewer than 2 sizes."""
    if len(ns) < 2:
        return None
    c, a = np.polyfit(np.asarray(ns, dtype=float), np.asarray(values, dtype=float), 1)
    return (float(a), float(c)) if c >= 0 else (float(np.mean(values)), 0.0)


def project(rows: list[dict], layout=None) -> dict:
    """metric -> {"power": {"exponent": b, label: value}, "affine": {"fixed": a, "per_sample": c, label: value}}
    for every fitted column; a fit is None where it cannot be made.

    Both fits, because they part ways when a metric is a large fixed cost plus a per-sample cost (library
    pages in memory, process start in times): between small N the power law sees a small exponent and
    projects far too little, while a + c N extrapolates the per-sample cost; the largest N measured tells
    which one holds. Timings of a few seconds on a shared machine carry noise that both extrapolate too."""
    ns = [r["n"] for r in rows]
    out = {}
    for key, _ in COLUMNS[2:]:
        values = [r[key] for r in rows]
        power, affine = fit_power_law(ns, values), fit_affine(ns, values)
        out[key] = {
            "power": None if power is None else {"exponent": power[1], **{label: power[0] * n ** power[1] for label, n in PROJECT_TO.items()}},
            "affine": None if affine is None else {"fixed": affine[0], "per_sample": affine[1],
                                                    **{label: affine[0] + affine[1] * n for label, n in PROJECT_TO.items()}},
        }
    if layout is not None:  # the file count follows from the layout rule: computed, not fitted
        out["cache_files"]["layout"] = {label: layout(n) for label, n in PROJECT_TO.items()}
    return out


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def report(rows: list[dict], fits: dict, header: str, shard_size: int) -> str:
    """The markdown table (one row per N, the exponent, the projections of both fits, the targets) and the
    verdicts at 14M."""
    keys = [k for k, _ in COLUMNS]
    fitted = keys[2:]

    def cell(key: str, fit: str, field: str) -> str:
        return _fmt(None if fits[key][fit] is None else fits[key][fit][field])

    lines = [header, "", "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    lines.append("| exponent b of a N^b | | " + " | ".join(cell(k, "power", "exponent") for k in fitted) + " |")
    for fit, name in (("power", "a N^b"), ("affine", "a + c N")):
        for label, n in PROJECT_TO.items():
            lines.append(f"| **{label}**, {name} | {_fmt(-(-n // shard_size))} | " + " | ".join(cell(k, fit, label) for k in fitted) + " |")
    if fits["cache_files"].get("layout"):
        for label, n in PROJECT_TO.items():
            lines.append(f"| **{label}**, cache layout | {_fmt(-(-n // shard_size))} | "
                         + " | ".join(_fmt(fits[k]["layout"][label]) if k == "cache_files" else "" for k in fitted) + " |")
    lines.append("| target (at most) | | " + " | ".join(_fmt(TARGETS[k][0]) if k in TARGETS else "" for k in fitted) + " |")
    label = next(iter(PROJECT_TO))
    lines += ["", f"Targets at {label}, fitted over the sizes measured (power law a N^b; affine a + c N):"]
    for key, (limit, what) in TARGETS.items():
        power, affine = fits[key]["power"], fits[key]["affine"]
        if fits[key].get("layout"):
            value = fits[key]["layout"][label]
            lines.append(f"- {what} ({key}): {_fmt(value)} by the cache's layout rule (exact, not fitted); target <= "
                         f"{_fmt(limit)}: {'MISSES' if value > limit else 'meets'}")
            continue
        if power is None and affine is None:
            lines.append(f"- {what} ({key}): no fit (needs two or more sizes); target <= {_fmt(limit)}")
            continue
        said = [f"{name} {_fmt(f[label])}" + (f" (b = {f['exponent']:.2f})" if "exponent" in f else "")
                for name, f in (("power law", power), ("affine", affine)) if f is not None]
        over = [f[label] > limit for f in (power, affine) if f is not None]
        verdict = "MISSES" if all(over) else "meets" if not any(over) else "MISSES by one fit"
        lines.append(f"- {what} ({key}): {', '.join(said)}; target <= {_fmt(limit)}: {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- `dho cache-info` against N (issue 28)
# A section of its own (`--cache-info`): the cache alone, no dataset on disk, so 1M samples take a minute.

CACHE_INFO_TARGET = 1.05  # at most this exponent b of cache-info seconds = a N^b (linear in N, not in N x C)
CACHE_INFO_COLUMNS = [("n", "N"), ("cache_write_s", "cache write s"), ("cache_files", "cache files"),
                      ("summarize_s", "cache-info s"), ("cli_s", "dho cache-info s"), ("densified_s", "densified (before) s")]

CACHE_INFO_SCRIPT = """
import json, sys, time
import dho.cache_info as ci
before = sys.argv[2] == "before"
if before:  # what cache-info did before issue 28: every top-k block densified to (n, C) for its argmax
    ci.top1 = lambda cache, view, start, stop: cache.probs(view, start, stop).argmax(axis=1)
t0 = time.perf_counter()
info = ci.summarize(sys.argv[1])
print(json.dumps({"s": time.perf_counter() - t0, "agreement": info["agreement"], "count": info["agreement_count"]}))
"""


def synthetic_dataset(n: int, shard_size: int, num_classes: int, seed: int):
    """What `write_cache` reads of a dataset (keys, labels, shard counts, fingerprint), without shards on disk:
    `dho cache-info` reads the cache only."""
    from types import SimpleNamespace

    labels = np.random.default_rng(seed).integers(0, num_classes, n)  # (N,)
    counts = [min(shard_size, n - first) for first in range(0, n, shard_size)]
    return SimpleNamespace(
        root=Path("synthetic"), fingerprint="0" * 64, num_samples=n, num_classes=num_classes,
        classnames=[f"class {c}" for c in range(num_classes)], labels=labels,
        keys=[f"n{labels[i]:08d}/n{labels[i]:08d}_{i}" for i in range(n)],
        shards=[SimpleNamespace(count=c) for c in counts],
    )


def cache_info_time(path: Path, before: bool) -> dict:
    """Seconds of `dho.cache_info.summarize` (what `dho cache-info` prints) in a fresh process, imports not counted."""
    proc = subprocess.run([sys.executable, "-c", CACHE_INFO_SCRIPT, str(path), "before" if before else "now"],
                          env=child_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"cache-info of {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def measure_cache_info(root: Path, n: int, args) -> dict:
    """cache-info of a complete top-k cache of N samples: summarize, the whole CLI, and (--before) densifying."""
    row: dict = {"n": n}
    t0 = time.perf_counter()
    write_cache(synthetic_dataset(n, args.shard_size, args.classes, args.seed), root / "c.zarr", args.views, args.topk,
                args.embed_dim, args.seed)
    row["cache_write_s"] = time.perf_counter() - t0
    row["cache_files"] = store_stats(root / "c.zarr")[0]
    now = cache_info_time(root / "c.zarr", before=False)
    row["summarize_s"], row["agreement"], row["agreement_count"] = now["s"], now["agreement"], now["count"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dho", "cache-info", str(root / "c.zarr")], env=child_env(),
                          capture_output=True, text=True)
    row["cli_s"] = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"dho cache-info failed:\n{proc.stderr[-3000:]}")
    row["densified_s"] = None
    if args.before:
        old = cache_info_time(root / "c.zarr", before=True)
        if (old["agreement"], old["count"]) != (now["agreement"], now["count"]):
            raise RuntimeError(f"agreement {now} now, {old} densified: they must be equal")
        row["densified_s"] = old["s"]
    return row


def cache_info_report(rows: list[dict], header: str) -> tuple[str, dict]:
    """The markdown table of the cache-info section, the exponent of each timing, the verdict -> (text, fits)."""
    ns = [r["n"] for r in rows]
    fits = {}
    for key, _ in CACHE_INFO_COLUMNS[1:]:
        values = [r[key] for r in rows]
        fit = None if None in values else fit_power_law(ns, values)
        fits[key] = None if fit is None else {"exponent": fit[1], **{label: fit[0] * n ** fit[1] for label, n in PROJECT_TO.items()}}
    lines = [header, "", "| " + " | ".join(h for _, h in CACHE_INFO_COLUMNS) + " |", "|" + "---|" * len(CACHE_INFO_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k, _ in CACHE_INFO_COLUMNS) + " |")
    lines.append("| exponent b of a N^b | " + " | ".join(_fmt(None if fits[k] is None else fits[k]["exponent"])
                                                        for k, _ in CACHE_INFO_COLUMNS[1:]) + " |")
    for label in PROJECT_TO:
        lines.append(f"| **{label}**, a N^b | " + " | ".join(_fmt(None if fits[k] is None else fits[k][label])
                                                           for k, _ in CACHE_INFO_COLUMNS[1:]) + " |")
    b = None if fits["summarize_s"] is None else fits["summarize_s"]["exponent"]
    verdict = "no fit (needs two or more sizes)" if b is None else f"b = {b:.2f}: {'MISSES' if b > CACHE_INFO_TARGET else 'meets'}"
    lines += ["", f"- cache-info seconds against N (summarize_s), target exponent <= {CACHE_INFO_TARGET}: {verdict}"]
    return "\n".join(lines), fits


def cache_info_main(args) -> int:
    """`--cache-info`: the cache-info section alone, over --sizes."""
    workdir = Path(tempfile.mkdtemp(prefix="dho-cache-info-")) if args.workdir is None else args.workdir
    rows = []
    try:
        for n in sorted(args.sizes):
            root = workdir / f"cache-info-n{n}"
            if root.exists():
                raise SystemExit(f"{root} exists; remove it or choose another --workdir")
            root.mkdir(parents=True)
            rows.append(measure_cache_info(root, n, args))
            print(f"N={n:,}: " + ", ".join(f"{k} {_fmt(rows[-1][k])}" for k, _ in CACHE_INFO_COLUMNS[1:]), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(root)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, CPU"
    header = (f"bench_scale --cache-info: {args.classes} classes, {args.shard_size}-sample shards, top-{args.topk} x "
              f"{args.views} views; {machine}")
    text, fits = cache_info_report(rows, header)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "machine": machine, "rows": rows, "fits": fits,
                                         "target_exponent": CACHE_INFO_TARGET}, indent=2) + "\n")
    return 0


def exponent_report(fits: dict) -> str:
    """The exponent targets' verdicts (issue 28): the fitted b of a N^b against its bound."""
    lines = ["", "Growth with N (power law a N^b over the sizes measured):"]
    for key, (limit, what) in EXPONENT_TARGETS.items():
        power = fits[key]["power"]
        if power is None:
            lines.append(f"- {what} ({key}): no fit (needs two or more sizes); target b <= {limit}")
        else:
            b = power["exponent"]
            lines.append(f"- {what} ({key}): b = {b:.2f}; target b <= {limit}: {'MISSES' if b > limit else 'meets'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="the N to measure")
    ap.add_argument("--quick", action="store_true", help="N = 600 and 1200, 100-sample shards, 20 classes, 1 worker (seconds)")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=1000, help="C (ImageNet-21k: 21841)")
    ap.add_argument("--views", type=int, default=2, help="teacher views per sample in the caches")
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--embed-dim", type=int, default=1024, help="D of the cache's text classifier (C x D float32); ViT-H-14: 1024")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the distill run")
    ap.add_argument("--batch-size", type=int, default=32, help="distill --batch-size (a multiple of --workers)")
    ap.add_argument("--steps", type=int, default=1, help="distill --max-steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--poll-s", type=float, default=0.05, help="memory sampling period of the distill run")
    ap.add_argument("--workdir", type=Path, default=None, help="where the data are generated (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    ap.add_argument("--json", type=Path, default=None, help="also write every number as JSON here")
    ap.add_argument("--cache-info", action="store_true", help="only the `dho cache-info` section: its time against N (issue 28)")
    ap.add_argument("--before", action="store_true", help="--cache-info: also time cache-info densifying every top-k block (before issue 28)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.shard_size, args.classes, args.workers, args.batch_size, args.embed_dim = [600, 1200], 100, 20, 1, 8, 16
    if args.workers and args.batch_size % args.workers:
        ap.error(f"--batch-size {args.batch_size} must be a multiple of --workers {args.workers}")
    if not 1 <= args.topk < args.classes:
        ap.error(f"--topk must be in [1, {args.classes - 1}]")
    if args.cache_info:
        return cache_info_main(args)

    workdir = Path(tempfile.mkdtemp(prefix="dho-scale-")) if args.workdir is None else args.workdir
    rows = []
    try:
        for n in sorted(args.sizes):
            root = workdir / f"n{n}"
            if root.exists():
                raise SystemExit(f"{root} exists; remove it or choose another --workdir")
            t0 = time.perf_counter()
            row = measure(root, n, args)
            row["total_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"N={n:,}: " + ", ".join(f"{k} {_fmt(row[k])}" for k, _ in COLUMNS[1:]) + f" ({row['total_s']:.0f} s)",
                  file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(root)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    fits = project(rows, layout=lambda n: layout_files(n, args.shard_size, args.views, args.topk))
    machine = f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, device {args.device}"
    header = (f"bench_scale: {args.classes} classes, {args.shard_size}-sample shards, top-{args.topk} x {args.views} views, "
              f"distill resnet-tiny with {args.workers} worker(s), batch {args.batch_size}+{args.batch_size}; {machine}")
    text = report(rows, fits, header, args.shard_size) + "\n" + exponent_report(fits)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "machine": machine, "rows": rows, "fits": fits, "targets": TARGETS}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
