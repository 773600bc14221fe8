"""`make demo`: the whole dho pipeline on real data, offline, on a laptop CPU, in a few minutes.

    python pipelines/demo/run_demo.py --out demo_out [--seed 0] [--epochs 12]

1. Data: scikit-learn's bundled handwritten digits, as 32 px RGB ImageFolder trees split into a
   teacher pre-training part and a disjoint task part (train / val / test) — make_digits.py.
2. A stand-in VLM: a small open_clip CLIP trained contrastively on the pre-training part with
   captions ("a photo of the number seven.") — train_teacher.py. It never sees the task images;
   it has real zero-shot knowledge, like a web-pretrained VLM.
3. The real commands, as a user runs them (each printed; logs in OUT/logs/):
   dho prepare (train/val/test) -> dho split --percent 8 (the labeled part; the rest is the
   unlabeled pool) -> dho precompute-teacher (4 views) -> dho distill --method ce | ce+kd | dho
   -> dho evaluate --search-on val (alpha/beta) -> dho evaluate on test.
4. A table of test accuracies: teacher zero-shot, CE only, SHO (ce+kd), DHO's heads and their
   combination with the alpha/beta chosen on val, plus the paths of the plots.

Deterministic for a seed (CPU). Out of scope: GPUs (the demo pins --device cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DHO = str(Path(sys.executable).parent / "dho")
LABELED_PERCENT = 8  # of the task's train part; the rest is the unlabeled pool
VIEWS = 4  # teacher views per image in the cache
BATCH = 32  # labeled + unlabeled per step (32 + 32)
STUDENT = "resnet-tiny"  # a real torchvision ResNet (BasicBlock x [1,1,1,1]) at 32 px, from scratch


def run(cmd: list, log: Path, quiet: bool = False) -> str:
    """Run one command, echo it, keep its output in `log`; stop the demo with the log tail on failure."""
    text = " ".join(shlex.quote(str(c)) for c in cmd)
    if not quiet:
        print(f"  $ {text}", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {text}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        sys.exit(f"demo: command failed (exit {proc.returncode}); log: {log}\n{tail}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (rebuilt from scratch)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data split, teacher and students")
    ap.add_argument("--epochs", type=int, default=12, help="student epochs (one epoch = one pass over the unlabeled pool)")
    ap.add_argument("--teacher-epochs", type=int, default=None, help="teacher pre-training epochs (default: train_teacher.py's)")
    args = ap.parse_args()
    out: Path = args.out.resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    logs, ds, runs = out / "logs", out / "datasets", out / "runs"
    py = sys.executable
    t0 = time.time()

    print("[1/6] data: scikit-learn digits -> ImageFolder trees (pre-training part + task train/val/test)")
    run([py, HERE / "make_digits.py", "--out", out / "digits", "--seed", args.seed], logs / "make_digits.log")

    print("[2/6] stand-in VLM: contrastive pre-training of a small CLIP on the pre-training part only")
    teacher_cmd = [py, HERE / "train_teacher.py", "--data", out / "digits" / "pretrain", "--config", HERE / "demo-clip.json",
                   "--out", out / "teacher.pt", "--seed", args.seed]
    if args.teacher_epochs:
        teacher_cmd += ["--epochs", args.teacher_epochs]
    run(teacher_cmd, logs / "train_teacher.log")

    print("[3/6] datasets: dho prepare + dho split")
    for part in ("train", "val", "test"):
        run([DHO, "prepare", out / "digits" / "task" / part, "--out", ds / part, "--shard-size", 64, "--seed", args.seed], logs / f"prepare_{part}.log")
    run([DHO, "split", ds / "train", "--out", ds / "labeled", "--percent", LABELED_PERCENT, "--seed", args.seed, "--shard-size", 16],
        logs / "split.log")

    print(f"[4/6] teacher cache: dho precompute-teacher ({VIEWS} augmented views per image)")
    teacher = ["--model", HERE / "demo-clip.json", "--pretrained", out / "teacher.pt", "--templates", HERE / "digits-templates.txt",
               "--device", "cpu", "--workers", 1, "--seed", args.seed]
    for name in ("train", "labeled"):
        run([DHO, "precompute-teacher", ds / name, "--out", out / f"{name}.zarr", "--views", VIEWS, *teacher], logs / f"precompute_{name}.log")
    # the teacher's own zero-shot accuracy on test (its evaluation view), for the table only
    run([DHO, "precompute-teacher", ds / "test", "--out", out / "test-teacher.zarr", "--views", 1, "--center-view", *teacher],
        logs / "precompute_test.log")
    zero_shot = _cache_agreement(out / "test-teacher.zarr")

    print("[5/6] students: dho distill with ce, ce+kd (SHO) and dho")
    common = ["--labeled", ds / "labeled", "--labeled-cache", out / "labeled.zarr", "--unlabeled", ds / "train",
              "--unlabeled-cache", out / "train.zarr", "--student", STUDENT, "--epochs", args.epochs, "--batch-size", BATCH,
              "--lr", "2e-3", "--weight-decay", "1e-2", "--device", "cpu", "--workers", 2, "--seed", args.seed, "--log-every", 50]
    for method in ("ce", "ce+kd", "dho"):
        extra = ["--log-grad-cosine", 10] if method in ("ce+kd", "dho") else []
        run([DHO, "distill", *common, "--method", method, "--out", runs / method, *extra], logs / f"distill_{method.replace('+', '_')}.log")

    print("[6/6] evaluation: alpha/beta searched on val, accuracies on test")
    results = {}
    for method in ("ce", "ce+kd"):
        results[method] = json.loads(run([DHO, "evaluate", runs / method, "--data", ds / "test", "--json", "--device", "cpu"],
                                         logs / f"evaluate_{method.replace('+', '_')}.log"))
    results["dho"] = json.loads(run([DHO, "evaluate", runs / "dho", "--data", ds / "test", "--search-on", ds / "val", "--json",
                                     "--device", "cpu"], logs / "evaluate_dho.log"))

    counts = {p: json.loads((ds / p / "manifest.json").read_text())["num_samples"] for p in ("train", "labeled", "val", "test")}
    teacher_info = json.loads((out / "teacher.json").read_text()) if (out / "teacher.json").exists() else {}
    d = results["dho"]
    rows = [
        ("teacher zero-shot (stand-in VLM)", 100 * zero_shot, None),
        ("CE only (labeled data)", results["ce"]["ce_head"]["top1"], results["ce"]["ce_head"]["top5"]),
        ("SHO: CE+KD, single head", results["ce+kd"]["ce_head"]["top1"], results["ce+kd"]["ce_head"]["top5"]),
        ("DHO ce_head  (alpha = 1)", d["ce_head"]["top1"], d["ce_head"]["top5"]),
        ("DHO kd_head  (alpha = 0)", d["kd_head"]["top1"], d["kd_head"]["top5"]),
        (f"DHO combined (alpha = {d['alpha']:g}, beta = {d['beta']:g})", d["combined"]["top1"], d["combined"]["top5"]),
    ]
    lines = [
        "",
        f"dho demo: handwritten digits (scikit-learn), 10 classes, seed {args.seed}",
        f"  task train {counts['train']} images, of which {counts['labeled']} labeled ({LABELED_PERCENT}%); "
        f"val {counts['val']} (alpha/beta search); test {counts['test']}",
        f"  teacher: small CLIP pre-trained on {teacher_info.get('pretrain_images', 'a disjoint set of')} other digit images; "
        f"student: {STUDENT} from scratch, {args.epochs} epochs",
        "",
        f"  {'method':<42} {'test top-1':>10} {'top-5':>7}",
        f"  {'-' * 42} {'-' * 10} {'-' * 7}",
    ]
    for name, top1, top5 in rows:
        lines.append(f"  {name:<42} {top1:>9.1f}% {('%.1f%%' % top5) if top5 is not None else '-':>7}")
    lines += [
        "",
        "  alpha/beta chosen on val (never on test): " + str(runs / "dho" / "alpha_beta_heatmap.png"),
        "  gradient cosine, DHO vs SHO (paper Fig. 4): " + ", ".join(str(runs / m / "grad_cosine.png") for m in ("dho", "ce+kd")),
        f"  everything else (datasets, caches, runs, logs): {out}   [{time.time() - t0:.0f} s]",
        "",
    ]
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"teacher_zero_shot_top1": 100 * zero_shot, **results}, indent=2) + "\n")
    print(table)


def _cache_agreement(path: Path) -> float:
    """Top-1 agreement of the teacher's evaluation view with the labels (what `dho cache-info` prints)."""
    from dho.cache import summarize

    return float(summarize(path)["agreement"])


if __name__ == "__main__":
    main()
