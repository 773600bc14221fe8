"""`make demo`: the whole dho pipeline on real data, offline, on a laptop CPU, over several seeds.

    python pipelines/demo/run_demo.py --out demo_out [--seeds 0,1,2,3,4] [--epochs 12]
        [--labeled-views auto|N] [--train-teacher]

1. The stand-in VLM teacher: a small open_clip CLIP pre-trained contrastively on digits that the
   task never uses, shipped in pipelines/demo/teacher/ (checked against its sha256; `make
   demo-teacher` retrains it, `--train-teacher` retrains it for this run only). Shipping it means
   every machine distils from the same teacher: its ~40 s of training was the most CPU-dependent
   step of the demo (other kernels, other floats, another teacher).
2. Per seed S (the seeds vary everything below; the teacher stays):
   data: scikit-learn's bundled digits as 32 px ImageFolder trees (make_digits.py --seed S draws
   the task's train/val/test cut) -> dho prepare -> dho split --percent 8 --seed S (the labeled
   part; the rest is the unlabeled pool) -> dho precompute-teacher (4 views of every image; the
   labeled cache gets enough views that no labeled crop is reused more than MAX_LABELED_REUSE
   times) -> dho distill --method ce | ce+kd | dho --seed S -> dho evaluate (alpha/beta of DHO
   searched on val) on test. DHO-F: the caches keep the teacher's image embeddings, `dho tip-adapter`
   fits Tip-Adapter-F (the paper's few-shot teacher) on the labeled part (its alpha/beta on val),
   `dho tip-adapter-cache` relabels the caches with it, and DHO is distilled from those.
3. A table of test top-1 over the seeds, mean ± std (population std over seeds) with every seed's
   value, and the paired differences the demo's story rests on; beside them, outside baselines on each
   seed's exact split (scikit-learn on the raw pixels: SVC and logistic regression on the labeled
   images, LabelSpreading on labeled + pool, SVC on all train labels; pipelines/demo/outside.py).

With 216 test images one image is 0.46 points, and one seed cannot order methods a point apart:
read the table with its spread. Deterministic for given seeds on one machine (CPU); another CPU
gives other floats, so other digits within the spread. Out of scope: GPUs (--device cpu).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DHO = str(Path(sys.executable).parent / "dho")
TEACHER_DIRS = {  # the shipped teachers per scene: teacher.pt.gz + teacher.json (made by `make demo-teacher [DEMO_SCENE=...]`)
    "plain": HERE / "teacher",
    "cluttered": HERE / "teacher-cluttered",
}
TEACHER_DIR = TEACHER_DIRS["plain"]
SEEDS = (0, 1, 2, 3, 4)  # ~1 min each on 2 cores
LABELED_PERCENT = 8  # of the task's train part; the rest is the unlabeled pool
VIEWS = 4  # teacher views per image of the unlabeled pool (each is drawn ~12 times over 12 epochs)
MAX_LABELED_REUSE = 4  # --labeled-views auto: enough labeled views that none is drawn more often than this
BATCH = 32  # labeled + unlabeled per step (32 + 32)
STUDENT = "resnet-tiny"  # a real torchvision ResNet (BasicBlock x [1,1,1,1]) at 32 px, from scratch
STUDENTS = {  # --student: (how the table names it, its learning rate)
    "resnet-tiny": ("resnet-tiny from scratch", "2e-3"),
    # the stand-in CLIP's own towers as the student (pretrained, text-initialised heads: self-distillation), as the
    # demo's --vlm-heads measurement (docs/fidelity.md section 2)
    "stand-in-clip": ("the stand-in CLIP's own towers (pretrained; self-distillation)", "5e-4"),
}
METHODS = ("ce", "ce+kd", "dho")
ROWS = (  # (key in a seed's results, table label)
    ("teacher", "teacher zero-shot (stand-in VLM)"),
    ("ce", "CE only (labeled data)"),
    ("sho", "SHO: CE+KD, single head"),
    ("dho_ce_head", "DHO ce_head  (alpha = 1)"),
    ("dho_kd_head", "DHO kd_head  (alpha = 0)"),
    ("dho_combined", "DHO combined (alpha, beta on val)"),
    ("tip_adapter_f", "Tip-Adapter-F teacher (few-shot)"),
    ("dho_f_combined", "DHO-F combined (Tip-Adapter-F)"),
)
if str(HERE) not in sys.path:  # pipelines/demo/outside.py, also when this file is loaded by path (tests/test_demo.py)
    sys.path.insert(0, str(HERE))
from outside import ROWS as OUTSIDE_ROWS  # noqa: E402

PAIRED = (("dho_combined", "sho"), ("dho_combined", "teacher"), ("sho", "teacher"), ("dho_ce_head", "sho"),
          ("dho_combined", "dho_ce_head"), ("tip_adapter_f", "teacher"), ("dho_f_combined", "tip_adapter_f"),
          ("dho_f_combined", "dho_combined"))
PAIRED_OUTSIDE = (("teacher", "svc_labeled"), ("dho_combined", "svc_labeled"), ("dho_combined", "label_spreading"),
                  ("sho", "label_spreading"))
README_MARKER = "<!-- demo table: made by `make demo-record` from pipelines/demo/results.json -->"
ANALYSIS_MARKER = "<!-- demo analyses: made by `make demo-record` from pipelines/demo/results.json -->"
FIGURES_DIR = HERE.parent.parent / "docs" / "figures"
FIGURES = {  # docs/figures/<name> (copied by --record) <- file of the first seed's folder
    "demo-grad-diagnostics.png": "analysis/grad_diagnostics.png",  # Figs. 4 and 13 over training, DHO vs SHO
    "demo-heads.png": "analysis/dho/heads.png",  # Fig. 15
    "demo-spectrum.png": "analysis/dho/spectrum.png",  # feature spectrum, heads' W W^T (Fig. 13)
    "demo-tsne-dho.png": "analysis/dho/tsne.png",  # Fig. 7, DHO
    "demo-tsne-sho.png": "analysis/ce+kd/tsne.png",  # Fig. 7, SHO
    "demo-alpha-beta.png": "runs/dho/alpha_beta_heatmap.png",  # Fig. 10
}


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


def labeled_draws(num_labeled: int, pool: int, epochs: int, batch: int = BATCH) -> float:
    """How often each labeled image is drawn over the run, with distill's own schedule arithmetic
    (default options: an epoch is one pass over the pool, which holds the labeled images)."""
    from dho.distill import draws_per_sample, schedule_steps

    _, total_steps = schedule_steps(pool, batch, epochs, "warmup-cosine")
    return draws_per_sample(total_steps, batch, num_labeled)


def unpack_teacher(out: Path, scene: str = "plain") -> tuple[Path, dict]:
    """The scene's shipped teacher as OUT/teacher.pt, after checking it is byte for byte the recorded one."""
    folder = TEACHER_DIRS[scene]
    record = json.loads((folder / "teacher.json").read_text())
    if record.get("scene", "plain") != scene:
        sys.exit(f"demo: {folder / 'teacher.json'} was pre-trained on the {record.get('scene', 'plain')} scene, not {scene}; "
                 f"retrain it with `make demo-teacher DEMO_SCENE={scene}`")
    payload = gzip.decompress((folder / "teacher.pt.gz").read_bytes())
    digest = hashlib.sha256(payload).hexdigest()
    if digest != record["sha256"]:
        sys.exit(f"demo: {folder / 'teacher.pt.gz'} has sha256 {digest}, {folder / 'teacher.json'} records "
                 f"{record['sha256']}: the file is damaged; restore it with git or retrain it with `make demo-teacher`")
    path = out / "teacher.pt"
    path.write_bytes(payload)
    return path, record


def train_teacher(out: Path, logs: Path, scene: str = "plain") -> tuple[Path, dict]:
    """Retrain the stand-in teacher on the fixed pre-training part of `scene` (what `make demo-teacher` ships)."""
    py = sys.executable
    run([py, HERE / "make_digits.py", "--out", out / "teacher-digits", "--scene", scene], logs / "teacher_digits.log")
    run([py, HERE / "train_teacher.py", "--data", out / "teacher-digits" / "pretrain", "--config", HERE / "demo-clip.json",
         "--out", out / "teacher.pt", "--seed", 0], logs / "train_teacher.log")
    return out / "teacher.pt", json.loads((out / "teacher.json").read_text())


def run_seed(out: Path, seed: int, teacher: Path, epochs: int, labeled_views: int | str, scene: str = "plain",
             student: str = STUDENT) -> dict:
    """The real commands for one seed under OUT/seed-S; -> {row key: test top-1 (%)} plus details."""
    py = sys.executable
    logs, ds, runs = out / "logs", out / "datasets", out / "runs"
    run([py, HERE / "make_digits.py", "--out", out / "digits", "--seed", seed, "--scene", scene], logs / "make_digits.log")
    for part in ("train", "val", "test"):
        run([DHO, "prepare", out / "digits" / "task" / part, "--out", ds / part, "--shard-size", 64, "--seed", seed],
            logs / f"prepare_{part}.log")
    run([DHO, "split", ds / "train", "--out", ds / "labeled", "--percent", LABELED_PERCENT, "--seed", seed,
         "--shard-size", 16], logs / "split.log")
    counts = {p: json.loads((ds / p / "manifest.json").read_text())["num_samples"] for p in ("train", "labeled", "val", "test")}
    draws = labeled_draws(counts["labeled"], counts["train"], epochs)
    if labeled_views == "auto":
        labeled_views = max(VIEWS, math.ceil(draws / MAX_LABELED_REUSE - 1e-9))

    teacher_args = ["--model", HERE / "demo-clip.json", "--pretrained", teacher, "--templates", HERE / "digits-templates.txt",
                    "--device", "cpu", "--workers", 1, "--seed", seed, "--store-embeddings"]  # embeddings: Tip-Adapter-F
    for name, views in (("train", VIEWS), ("labeled", labeled_views)):
        run([DHO, "precompute-teacher", ds / name, "--out", out / f"{name}.zarr", "--views", views, *teacher_args],
            logs / f"precompute_{name}.log")
    # the teacher's own zero-shot accuracy on test (its evaluation view), for the table only; val's evaluation
    # view for Tip-Adapter-F's alpha/beta search
    for name in ("test", "val"):
        run([DHO, "precompute-teacher", ds / name, "--out", out / f"{name}-teacher.zarr", "--views", 1, "--center-view",
             *teacher_args], logs / f"precompute_{name}.log")

    student_args = ["--student", STUDENT] if student == STUDENT else \
        ["--student", HERE / "demo-clip.json", "--student-pretrained", teacher]
    common = ["--labeled", ds / "labeled", "--labeled-cache", out / "labeled.zarr", "--unlabeled", ds / "train",
              "--unlabeled-cache", out / "train.zarr", *student_args, "--epochs", epochs, "--batch-size", BATCH,
              "--lr", STUDENTS[student][1], "--weight-decay", "1e-2", "--device", "cpu", "--workers", 2, "--seed", seed, "--log-every", 50]
    evals = {}
    for method in METHODS:
        tag = method.replace("+", "_")
        extra = ["--log-grad-cosine", 10] if method in ("ce+kd", "dho") else []
        run([DHO, "distill", *common, "--method", method, "--out", runs / method, *extra], logs / f"distill_{tag}.log")
        search = ["--search-on", ds / "val"] if method == "dho" else []
        evals[method] = json.loads(run([DHO, "evaluate", runs / method, "--data", ds / "test", *search, "--json",
                                        "--device", "cpu"], logs / f"evaluate_{tag}.log"))
    # DHO-F: Tip-Adapter-F fitted on the labeled part from the cached embeddings, the caches relabelled with it;
    # every cached view in every epoch (--epoch-views all), as when results.json was recorded
    tip = out / "tip-adapter-f.pt"
    fitted = json.loads(run([DHO, "tip-adapter", "--labeled", ds / "labeled", "--labeled-cache", out / "labeled.zarr",
                             "--val", ds / "val", "--val-cache", out / "val-teacher.zarr", "--epoch-views", "all",
                             "--seed", seed, "--device", "cpu", "--out", tip], logs / "tip_adapter.log"))
    for name, cache in (("train", "train.zarr"), ("labeled", "labeled.zarr"), ("test", "test-teacher.zarr")):
        run([DHO, "tip-adapter-cache", tip, "--dataset", ds / name, "--cache", out / cache, "--out", out / f"{name}-tipf.zarr",
             "--device", "cpu"], logs / f"tip_adapter_cache_{name}.log")
    tipf_common = [out / "labeled-tipf.zarr" if c == out / "labeled.zarr" else out / "train-tipf.zarr" if c == out / "train.zarr"
                   else c for c in common]
    run([DHO, "distill", *tipf_common, "--method", "dho", "--out", runs / "dho-f"], logs / "distill_dho_f.log")
    evals["dho-f"] = json.loads(run([DHO, "evaluate", runs / "dho-f", "--data", ds / "test", "--search-on", ds / "val",
                                     "--json", "--device", "cpu"], logs / "evaluate_dho_f.log"))
    d = evals["dho"]
    top1 = {
        "teacher": 100 * _cache_agreement(out / "test-teacher.zarr"),
        "ce": evals["ce"]["ce_head"]["top1"],
        "sho": evals["ce+kd"]["ce_head"]["top1"],
        "dho_ce_head": d["ce_head"]["top1"],
        "dho_kd_head": d["kd_head"]["top1"],
        "dho_combined": d["combined"]["top1"],
        "tip_adapter_f": 100 * _cache_agreement(out / "test-tipf.zarr"),
        "dho_f_combined": evals["dho-f"]["combined"]["top1"],
    }
    from outside import outside_baselines  # pipelines/demo/outside.py

    outside = outside_baselines(out / "digits" / "digits.json", ds / "labeled")
    top5 = {"ce": evals["ce"]["ce_head"]["top5"], "sho": evals["ce+kd"]["ce_head"]["top5"],
            "dho_ce_head": d["ce_head"]["top5"], "dho_kd_head": d["kd_head"]["top5"], "dho_combined": d["combined"]["top5"],
            "dho_f_combined": evals["dho-f"]["combined"]["top5"]}
    return {"seed": seed, "top1": top1, "top5": top5, "alpha": d["alpha"], "beta": d["beta"], "counts": counts,
            "dho_f_alpha_beta": [evals["dho-f"]["alpha"], evals["dho-f"]["beta"]],
            "tip_adapter_f": {"alpha": fitted["alpha"], "beta": fitted["beta"], "val_top1": fitted["val_top1"]},
            "labeled_views": int(labeled_views), "labeled_draws_per_image": round(draws, 2), "outside": outside}


def run_analyses(out: Path) -> dict:
    """The paper's analyses of one seed's runs (the demo's figures): the gradient-conflict diagnostics of
    DHO and SHO over training in one plot, `dho analyze` of both (head agreement, feature spectrum, a
    linear probe on the task's fully labeled train part, t-SNE) and `dho bench-inference` of DHO."""
    from dho.distill import plot_grad_diagnostics

    logs, ds, runs, analysis = out / "logs", out / "datasets", out / "runs", out / "analysis"
    analysis.mkdir(exist_ok=True)
    series = {}
    for method in ("dho", "ce+kd"):
        lines = (runs / method / "metrics.jsonl").read_text().splitlines()
        series[method] = [r for r in map(json.loads, lines) if "grad_cosine" in r]
    plot_grad_diagnostics(series, analysis / "grad_diagnostics.png")
    summary = {}
    for method in ("dho", "ce+kd"):
        summary[method] = json.loads(run([DHO, "analyze", runs / method, "--data", ds / "test", "--probe-train", ds / "train",
                                          "--tsne", "--out-dir", analysis / method, "--json", "--device", "cpu"],
                                         logs / f"analyze_{method.replace('+', '_')}.log"))
    # the cache names its teacher by the config file's stem: the file itself is passed (random weights: cost only)
    cost = json.loads(run([DHO, "bench-inference", runs / "dho", "--teacher-model", HERE / "demo-clip.json", "--device", "cpu",
                           "--batch-sizes", "1,64", "--warmup", 2,
                           "--iters", 5, "--min-seconds", 0.2, "--json"], logs / "bench_inference.log"))
    last = {m: series[m][-1] for m in series}
    return {
        "heads": {k: summary["dho"][k] for k in ("top1", "both_correct", "ce_only", "kd_only", "both_wrong", "agreement",
                                                 "error_reduction")},
        "probe_top1": {m: summary[m]["probe"]["top1"] for m in summary},
        "effective_rank": {m: summary[m]["effective_rank"] for m in summary},
        "grad_last": last,
        "grad_mean": {m: {k: statistics.fmean(r[k] for r in series[m]) for k in ("grad_cosine", "grad_cosine_z", "pred_inner")}
                      for m in series},
        "cost": {name: {k: cost["models"][name][k] for k in ("params", "gmacs")} for name in ("student", "single_head", "teacher")},
    }


def format_analysis(record: dict) -> str:
    """The README's lines on the first seed's analyses (from results.json)."""
    a = record["analysis"]
    h, g, c = a["heads"], a["grad_mean"], a["cost"]
    er = h["error_reduction"]
    pct = lambda x, y: 100.0 * (x / y - 1)  # noqa: E731
    return "\n".join([
        f"seed {record['per_seed'][0]['seed']}, test set; gradient diagnostics averaged over training (every 10 steps)",
        f"  cos(∇θ L_CE, ∇θ L_KD):   DHO {g['dho']['grad_cosine']:+.3f}   SHO {g['ce+kd']['grad_cosine']:+.3f}",
        f"  cos(∇z L_CE, ∇z L_KD):   DHO {g['dho']['grad_cosine_z']:+.3f}   SHO {g['ce+kd']['grad_cosine_z']:+.3f}",
        f"  (p̂_CE − y)ᵀ(p̂_KD − p):   DHO {g['dho']['pred_inner']:+.3f}   SHO {g['ce+kd']['pred_inner']:+.3f}",
        f"  heads (DHO): both correct {h['both_correct']:.1f}%, only ce_head {h['ce_only']:.1f}%, only kd_head "
        f"{h['kd_only']:.1f}%, both wrong {h['both_wrong']:.1f}%; argmax agreement {h['agreement']:.1f}%",
        f"  error reduction: kd_head fails {er['kd_head']['failed']:.1f}% -> combined still fails {er['kd_head']['still_failed']:.1f}%; "
        f"ce_head {er['ce_head']['failed']:.1f}% -> {er['ce_head']['still_failed']:.1f}%",
        f"  linear probe on frozen g (train part, all labels): DHO {a['probe_top1']['dho']:.1f}%, SHO {a['probe_top1']['ce+kd']:.1f}%; "
        f"feature effective rank DHO {a['effective_rank']['dho']:.1f}, SHO {a['effective_rank']['ce+kd']:.1f}",
        f"  inference: student {c['student']['params'] / 1e6:.3f} M params, {c['student']['gmacs'] * 1e3:.1f} M MACs/image "
        f"(+{pct(c['student']['params'], c['single_head']['params']):.1f}% params, "
        f"+{pct(c['student']['gmacs'], c['single_head']['gmacs']):.2f}% MACs over one head); "
        f"teacher {c['teacher']['params'] / 1e6:.2f} M params, {c['teacher']['gmacs'] * 1e3:.1f} M MACs/image",
    ])


def _cache_agreement(path: Path) -> float:
    """Top-1 agreement of the teacher's evaluation view with the labels (what `dho cache-info` prints)."""
    from dho.cache_info import summarize

    return float(summarize(path)["agreement"])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


SHORT = {"teacher": "teacher", "ce": "CE only", "sho": "SHO", "dho_ce_head": "DHO ce_head", "dho_kd_head": "DHO kd_head",
         "dho_combined": "DHO combined", "tip_adapter_f": "Tip-Adapter-F", "dho_f_combined": "DHO-F combined",
         "svc_labeled": "SVC (labeled)", "label_spreading": "LabelSpreading"}


def format_table(record: dict) -> str:
    """The demo's table from its results.json record: per row mean ± std over seeds and every seed's
    value, then paired differences (same seed) with wins/ties/losses. No timings: the README shows it."""
    per_seed = record["per_seed"]
    seeds = [r["seed"] for r in per_seed]
    c = per_seed[0]["counts"]
    views = sorted({r["labeled_views"] for r in per_seed})
    scene = record.get("scene", "plain")  # results.json recorded before the cluttered scene have no "scene"
    task = "handwritten digits (scikit-learn)" if scene == "plain" else \
        "handwritten digits (scikit-learn) at random size, place and ink on textures, 32 px"
    lines = [
        f"dho demo: {task}, 10 classes, {len(seeds)} seed(s): {' '.join(map(str, seeds))}",
        f"  task train {c['train']} images, of which {c['labeled']} labeled ({LABELED_PERCENT}%); "
        f"val {c['val']} (alpha/beta search); test {c['test']} (one image = {100 / c['test']:.2f} points)",
        f"  teacher: small CLIP pre-trained on {record['teacher_pretrain_images']} other digit images (shipped); "
        f"student: {STUDENTS[record.get('student', STUDENT)][0]}, {record['epochs']} epochs",
        f"  teacher views: {VIEWS} per unlabeled image, {'/'.join(map(str, views))} per labeled image "
        f"(each labeled crop drawn <= {MAX_LABELED_REUSE} times)",
        "",
        f"  {'method':<36} {'test top-1, mean ± std':>22}   per seed",
        f"  {'-' * 36} {'-' * 22}   {'-' * 8}",
    ]
    for key, label in ROWS:
        values = [r["top1"][key] for r in per_seed]
        m, s = mean_std(values)
        lines.append(f"  {label:<36} {m:>14.1f} ± {s:>4.1f}%   " + " ".join(f"{v:.1f}" for v in values))
    outside = all("outside" in r for r in per_seed)
    if outside:
        pixels = "8x8" if scene == "plain" else "32x32 RGB"
        lines += ["", f"  outside baselines: scikit-learn on the raw {pixels} pixels, each seed's split (pipelines/demo/outside.py)"]
        for key, label in OUTSIDE_ROWS:
            values = [r["outside"][key] for r in per_seed]
            m, s = mean_std(values)
            lines.append(f"  {label:<36} {m:>14.1f} ± {s:>4.1f}%   " + " ".join(f"{v:.1f}" for v in values))

    def value(r: dict, key: str) -> float:
        return r["top1"][key] if key in r["top1"] else r["outside"][key]

    lines += ["", f"  {'paired difference (same seed)':<36} {'mean ± std':>22}   wins/ties/losses"]
    for a, b in PAIRED + (PAIRED_OUTSIDE if outside else ()):
        diffs = [value(r, a) - value(r, b) for r in per_seed]
        m, s = mean_std(diffs)
        wins, ties = sum(d > 1e-9 for d in diffs), sum(abs(d) <= 1e-9 for d in diffs)
        lines.append(f"  {SHORT[a] + ' - ' + SHORT[b]:<36} {m:>+13.1f} ± {s:>4.1f} pt   {wins}/{ties}/{len(diffs) - wins - ties}")
    lines.append("  alpha, beta chosen on val per seed: " + ", ".join(f"({r['alpha']:g}, {r['beta']:g})" for r in per_seed))
    lines.append("  DHO-F: the same student distilled from Tip-Adapter-F (fitted on the labeled images, its alpha/beta")
    lines.append("  on val); its alpha, beta: " + ", ".join("({:g}, {:g})".format(*r["dho_f_alpha_beta"]) for r in per_seed))
    return "\n".join(lines)


def record_results(out: Path) -> None:
    """Make OUT's multi-seed run the recorded one: copy its results.json to pipelines/demo/ and put
    its table into README.md (what `tests/test_demo.py` checks the README against), its first seed's
    figures into docs/figures."""
    results = out / "results.json"
    if not results.is_file():
        sys.exit(f"demo: {results} not found; run `make demo` first")
    record = json.loads(results.read_text())
    if "analysis" in record:
        FIGURES_DIR.mkdir(parents=True, exist_ok=True)
        first = out / f"seed-{record['per_seed'][0]['seed']}"
        for name, rel in FIGURES.items():
            shutil.copyfile(first / rel, FIGURES_DIR / name)
    write_record(record)
    print(f"recorded {results} -> {HERE / 'results.json'}, the tables in the README and the figures in {FIGURES_DIR}")


def write_record(record: dict) -> None:
    """`record` as pipelines/demo/results.json, its tables in README.md."""
    readme = HERE.parent.parent / "README.md"
    text = readme.read_text()
    start = text.index(README_MARKER)
    begin = text.index("```text\n", start) + len("```text\n")
    end = text.index("```", begin)
    text = text[:begin] + format_table(record) + "\n" + text[end:]
    if "analysis" in record:
        start = text.index(ANALYSIS_MARKER)
        begin = text.index("```text\n", start) + len("```text\n")
        end = text.index("```", begin)
        text = text[:begin] + format_analysis(record) + "\n" + text[end:]
    readme.write_text(text)
    (HERE / "results.json").write_text(json.dumps(record, indent=1) + "\n")


def record_outside() -> None:
    """Add the outside baselines to the recorded run: each recorded seed's split remade (make_digits.py, dho prepare,
    dho split, as run_seed runs them; they depend on the seed only), its baselines, results.json and the README."""
    import tempfile

    from outside import outside_baselines

    record = json.loads((HERE / "results.json").read_text())
    with tempfile.TemporaryDirectory() as work:
        for r in record["per_seed"]:
            out, seed = Path(work) / f"seed-{r['seed']}", r["seed"]
            logs = out / "logs"
            run([sys.executable, HERE / "make_digits.py", "--out", out / "digits", "--seed", seed, "--scene",
                 record.get("scene", "plain")], logs / "make_digits.log")
            run([DHO, "prepare", out / "digits" / "task" / "train", "--out", out / "train", "--shard-size", 64, "--seed", seed],
                logs / "prepare_train.log")
            run([DHO, "split", out / "train", "--out", out / "labeled", "--percent", LABELED_PERCENT, "--seed", seed,
                 "--shard-size", 16], logs / "split.log")
            r["outside"] = outside_baselines(out / "digits" / "digits.json", out / "labeled")
            print(f"seed {seed}: " + ", ".join(f"{k} {r['outside'][k]:.1f}" for k, _ in OUTSIDE_ROWS))
    write_record(record)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (rebuilt from scratch)")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                    help="comma-separated seeds: data split, labeled split, teacher views and student init (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=12, help="student epochs (one epoch = one pass over the unlabeled pool)")
    ap.add_argument("--labeled-views", default="auto",
                    help=f"teacher views per labeled image; auto = enough that none is drawn more than {MAX_LABELED_REUSE} times")
    ap.add_argument("--scene", choices=tuple(TEACHER_DIRS), default="plain",
                    help="the task's images (make_digits.py --scene) and the shipped teacher pre-trained on them: plain = "
                         "the 8x8 digit filling the image (default); cluttered = digits at random size, place and ink on "
                         "textures, where pixels fail and, in 12 epochs, so do the students (docs/demo.md)")
    ap.add_argument("--student", choices=tuple(STUDENTS), default=STUDENT,
                    help="resnet-tiny from scratch (default), or stand-in-clip: the teacher's own pretrained towers")
    ap.add_argument("--train-teacher", action="store_true",
                    help="retrain the stand-in teacher (~40 s, CPU-dependent) instead of using the shipped one")
    ap.add_argument("--no-analyses", action="store_true",
                    help="skip the first seed's analyses (dho analyze, gradient diagnostics, bench-inference) and figures")
    ap.add_argument("--record", action="store_true",
                    help="do not run: make OUT's finished run the recorded one (pipelines/demo/results.json, README table)")
    ap.add_argument("--record-outside", action="store_true",
                    help="do not run: add the outside baselines (pipelines/demo/outside.py) to the recorded run")
    args = ap.parse_args()
    if args.record_outside:
        record_outside()
        return
    if args.record:
        record_results(args.out.resolve())
        return
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        labeled_views = args.labeled_views if args.labeled_views == "auto" else int(args.labeled_views)
    except ValueError:
        sys.exit(f"demo: --seeds takes integers like 0,1,2 and --labeled-views auto or an integer; got "
                 f"{args.seeds!r}, {args.labeled_views!r}")
    if not seeds or args.epochs < 1 or (labeled_views != "auto" and labeled_views < 1):
        sys.exit("demo: need at least one seed, --epochs >= 1 and --labeled-views >= 1")
    out: Path = args.out.resolve()
    if out.exists():
        if not (out / "demo.json").exists() and any(out.iterdir()):
            sys.exit(f"demo: {out} exists and is not a demo output folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "demo.json").write_text(json.dumps({"seeds": seeds, "epochs": args.epochs, "complete": False}) + "\n")
    t0 = time.time()

    if args.train_teacher:
        print("[teacher] retraining the stand-in VLM on the fixed pre-training part of the digits (~40 s)")
        teacher, record = train_teacher(out, out / "logs", args.scene)
    else:
        teacher, record = unpack_teacher(out, args.scene)
        print(f"[teacher] the shipped stand-in VLM ({TEACHER_DIRS[args.scene].relative_to(HERE.parent.parent)}, "
              f"sha256 {record['sha256'][:12]})")
    per_seed = []
    for i, seed in enumerate(seeds):
        print(f"[seed {seed}] ({i + 1}/{len(seeds)}) data, teacher caches, students ce / ce+kd / dho, Tip-Adapter-F and "
              "DHO-F, evaluation", flush=True)
        t_seed = time.time()
        result = run_seed(out / f"seed-{seed}", seed, teacher, args.epochs, labeled_views, args.scene, args.student)
        if i == 0 and not args.no_analyses:
            t_an = time.time()
            print(f"[seed {seed}] analyses: gradient diagnostics, dho analyze, dho bench-inference", flush=True)
            analysis = run_analyses(out / f"seed-{seed}")
            analysis["wall_s"] = round(time.time() - t_an, 1)
        result["wall_s"] = round(time.time() - t_seed, 1)
        per_seed.append(result)
        print("  test top-1: " + ", ".join(f"{k} {v:.1f}" for k, v in result["top1"].items()) + f"  [{result['wall_s']:.0f} s]")

    wall = time.time() - t0
    summary = {key: dict(zip(("mean", "std"), mean_std([r["top1"][key] for r in per_seed]))) for key, _ in ROWS}
    results = {"seeds": seeds, "epochs": args.epochs, "scene": args.scene, "student": args.student,
               "teacher_sha256": record["sha256"],
               "teacher_pretrain_images": record.get("num_images"), "summary": summary, "per_seed": per_seed,
               "wall_s": round(wall, 1)}
    if not args.no_analyses:
        results["analysis"] = analysis
    table = format_table(results)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "demo.json").write_text(json.dumps({"seeds": seeds, "epochs": args.epochs, "complete": True}) + "\n")
    print("\n" + table)
    if not args.no_analyses:
        print(format_analysis(results) + "\n")
    print(f"  everything (datasets, caches, runs, alpha/beta heatmaps, gradient diagnostics, analyses, logs): {out}/seed-*"
          f"   [{wall:.0f} s]\n")


if __name__ == "__main__":
    main()
