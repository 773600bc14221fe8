"""Ablations on the demo's data: rerun its students under other settings, over the same seeds.

    python pipelines/demo/ablation.py --demo demo_out --labeled-views 4,16,64,auto-1 [--methods ce,ce+kd,dho]
        [--distill KEY=VALUE ...] [--name NAME]

Reads a finished `make demo` folder (its datasets and unlabeled-pool caches per seed, and the
shipped teacher it unpacked), makes a labeled cache with each view count (`auto-R` = enough views
that no labeled crop is drawn more than R times over the run), trains each method on it with the
demo's options (plus `--distill` overrides, e.g. `epochs=24`), evaluates on test (DHO: alpha and
beta searched on val) and prints, per view count, test top-1 mean ± std over the seeds.
Everything lands in DEMO/ablations/NAME/ and is reused when it is already complete, so an
ablation grows by rerunning with more settings.

This is how the labeled-view table of docs/fidelity.md and the demo investigation in
docs/demo.md were made. Deterministic on one machine, like the demo.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _demo_module():
    spec = importlib.util.spec_from_file_location("dho_run_demo", HERE / "run_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _demo_module()
COLUMNS = (("ce", "ce_head", "CE only"), ("ce+kd", "ce_head", "SHO"), ("dho", "ce_head", "DHO ce_head"),
           ("dho", "kd_head", "DHO kd_head"), ("dho", "combined", "DHO combined"))


def labeled_cache(seed_dir: Path, seed: int, teacher: Path, views: int) -> Path:
    """The seed's labeled dataset cached with `views` teacher views (made once)."""
    path = seed_dir / f"labeled-v{views}.zarr"
    if not (path / "zarr.json").exists() or not _complete(path):
        demo.run([demo.DHO, "precompute-teacher", seed_dir / "datasets" / "labeled", "--out", path, "--views", views,
                  "--model", HERE / "demo-clip.json", "--pretrained", teacher, "--templates", HERE / "digits-templates.txt",
                  "--device", "cpu", "--workers", 1, "--seed", seed], seed_dir / "logs" / f"precompute_labeled_v{views}.log")
    return path


def _complete(path: Path) -> bool:
    from dho.cache_info import summarize

    try:
        return bool(summarize(path)["complete"])
    except Exception:  # a half-made or foreign store: make it again
        return False


def train_and_evaluate(seed_dir: Path, seed: int, cache: Path, method: str, out: Path, epochs: int, overrides: list[str]) -> dict:
    """One student with the demo's options (+ overrides); -> dho evaluate's JSON on test."""
    result = out / "evaluate.json"
    if result.exists():
        return json.loads(result.read_text())
    ds = seed_dir / "datasets"
    cmd = [demo.DHO, "distill", "--labeled", ds / "labeled", "--labeled-cache", cache, "--unlabeled", ds / "train",
           "--unlabeled-cache", seed_dir / "train.zarr", "--student", demo.STUDENT, "--epochs", epochs,
           "--batch-size", demo.BATCH, "--lr", "2e-3", "--weight-decay", "1e-2", "--device", "cpu", "--workers", 2,
           "--seed", seed, "--log-every", 50, "--method", method, "--out", out]
    for item in overrides:
        key, _, value = item.partition("=")
        cmd += [f"--{key.replace('_', '-')}"] + ([value] if value != "" else [])
    if out.exists():  # a run that did not finish: start it again
        import shutil

        shutil.rmtree(out)
    demo.run(cmd, out.parent / f"{out.name}.distill.log", quiet=True)
    search = ["--search-on", ds / "val"] if method == "dho" else []
    evaluation = json.loads(demo.run([demo.DHO, "evaluate", out, "--data", ds / "test", *search, "--json", "--device", "cpu"],
                                     out.parent / f"{out.name}.evaluate.log", quiet=True))
    result.write_text(json.dumps(evaluation, indent=1) + "\n")
    return evaluation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, default=Path("demo_out"), help="a finished `make demo` output folder")
    ap.add_argument("--labeled-views", default="auto-4", help="comma-separated view counts of the labeled cache, or auto-R")
    ap.add_argument("--methods", default="ce,ce+kd,dho", help="comma-separated --method values")
    ap.add_argument("--distill", action="append", default=[], metavar="KEY=VALUE", help="extra `dho distill` option (repeatable)")
    ap.add_argument("--name", default=None, help="sub-folder of DEMO/ablations (default: from the settings)")
    args = ap.parse_args()
    record = json.loads((args.demo / "results.json").read_text()) if (args.demo / "results.json").exists() else None
    if record is None:
        sys.exit(f"ablation: {args.demo} holds no finished demo (results.json); run `make demo` first")
    epochs = int(next((o.split("=", 1)[1] for o in args.distill if o.startswith("epochs=")), record["epochs"]))
    overrides = [o for o in args.distill if not o.startswith("epochs=")]
    methods = [m for m in args.methods.split(",") if m]
    name = args.name or "_".join(["views-" + args.labeled_views.replace(",", "-")] + [o.replace("=", "-") for o in args.distill])
    root = args.demo.resolve() / "ablations" / name
    teacher = args.demo.resolve() / "teacher.pt"

    table: dict[str, dict[str, list[float]]] = {}
    for seed_result in record["per_seed"]:
        seed = seed_result["seed"]
        seed_dir = args.demo.resolve() / f"seed-{seed}"
        draws = demo.labeled_draws(seed_result["counts"]["labeled"], seed_result["counts"]["train"], epochs)
        for spec in args.labeled_views.split(","):
            views = math.ceil(draws / int(spec[5:])) if spec.startswith("auto-") else int(spec)
            cache = labeled_cache(seed_dir, seed, teacher, views)
            row = table.setdefault(spec, {})
            row.setdefault("views", []).append(views)
            row.setdefault("reuse", []).append(draws / views)
            for method in methods:
                evaluation = train_and_evaluate(seed_dir, seed, cache, method, root / f"seed-{seed}" / f"{method}-v{views}",
                                                epochs, overrides)
                for m, head, label in COLUMNS:
                    if m == method:
                        row.setdefault(label, []).append(evaluation[head]["top1"])
            print(f"  seed {seed}, labeled views {views}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in row.items()
                                                                         if k not in ("views", "reuse")), flush=True)

    labels = [label for m, _, label in COLUMNS if m in methods]
    lines = [f"ablation {name}: {len(record['per_seed'])} seeds, {epochs} epochs, test top-1 mean ± std (%)",
             f"{'labeled views':<16}{'reuse':>7}  " + "  ".join(f"{label:>14}" for label in labels)]
    for spec, row in table.items():
        views = "/".join(str(v) for v in sorted(set(row["views"])))
        cells = []
        for label in labels:
            m, s = demo.mean_std(row[label])
            cells.append(f"{m:>7.1f} ± {s:>4.1f}")
        lines.append(f"{spec + ' (' + views + ')':<16}{max(row['reuse']):>7.1f}  " + "  ".join(cells))
    text = "\n".join(lines)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(text + "\n")
    (root / "results.json").write_text(json.dumps({"epochs": epochs, "overrides": args.distill, "rows": table}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
