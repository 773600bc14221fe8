"""The last stage of `make reproduce-fewshot`: our few-shot top-1 (mean ± std over seeds) beside the paper.

    python pipelines/fewshot/report.py --eval runs/fewshot/oxford_pets/eval --recipe pipelines/fewshot/coop-resnet18.yaml \
        --dataset oxford_pets --shots "1 2 4 8 16" --seeds "1 2 3" --out runs/fewshot/oxford_pets/table.md [--smoke]

Reads, per K shots and seed S (pair `kK-sS`), from --eval:
  zs-kK-sS.json           `dho evaluate --json` of the student distilled from the zero-shot teacher (DHO)
  fs-kK-sS.json           the same for the student distilled from Tip-Adapter-F (DHO-F)
  teacher-fs-kK-sS.json   `dho cache-info --json` of the test cache relabelled by Tip-Adapter-F: its top-1
  teacher-zs.json         `dho cache-info --json` of the test cache: the zero-shot teacher's top-1
  M-kK-sS.json            per baseline run named in --baselines (`dho distill --method M` from the zero-shot
                          teacher): its `dho evaluate --json`, the head the method trained; KD uses no labels and
                          runs once per seed (on the first K's split): its row repeats it under every K
and the paper's numbers from the recipe's `expected:` section (`top1` = DHO, `dho_f`, `tip_adapter_f`,
`teacher.top1`, `baselines.M`). Writes the table to --out (atomically) and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tables import fmt, read_json, write_table, write_text_atomic  # noqa: E402


def _read_json(path: Path) -> dict:
    return read_json(path, "reproduce-fewshot")


def _agreement(info: dict) -> float | None:
    """A cache's teacher top-1 (%) on its labeled samples (center view), from `cache-info --json`."""
    return None if info.get("agreement") is None else 100.0 * info["agreement"]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


_fmt = fmt
# single-head baselines, as Table 1 names them
BASELINE_ROWS = {"kd": "KD", "ce": "CE", "ce+kd": "CE+KD (logit)", "ce+kd-feature": "CE+KD (feature)",
                 "ce+kd+pcgrad": "CE+KD (logit) + PCGrad",  # PCGrad: the authors' train_imgnet_pc_grad.py, not in the paper
                 "sskd": "SSKD", "dhkd": "DHKD"}  # the dual-head KD baselines of §4.2's text (ImageNet, ResNet-50); h_CE predicts
# the DHO student's model scored with one head (alpha 1 or 0, Fig. 8's ablations DHO (h_CE), DHO (h_KD))
HEAD_ROWS = {"ce_head": "DHO (h_CE)", "kd_head": "DHO (h_KD)"}


def baseline_runs(names: list[str]) -> dict[str, dict[int, dict[int, str]]]:
    """'ce+kd-k1-s2' ... -> {method: {K: {seed: run name}}}; a name that is not METHOD-kK-sS exits in one line."""
    runs: dict[str, dict[int, dict[int, str]]] = {}
    for name in names:
        method, _, pair = name.rpartition("-k")
        k, _, seed = pair.partition("-s")
        if method not in BASELINE_ROWS or not k.isdigit() or not seed.isdigit():
            sys.exit(f"error: --baselines {name!r}: want METHOD-kK-sS with METHOD one of {', '.join(BASELINE_ROWS)}")
        runs.setdefault(method, {}).setdefault(int(k), {})[int(seed)] = name
    return runs


def _fmt_ms(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _delta(values: list[float] | None, paper: float | None) -> str:
    return "–" if not values or paper is None else f"{round(mean_std(values)[0] - paper, 1) + 0.0:+.1f}"  # no -0.0


def variant_row(name: str) -> str:
    """Table 14's row name of a recipe variant: 'nl-head-kd' -> 'DHO (nl-head-kd)'."""
    return f"DHO ({name})"


def variant_runs(names: list[str]) -> dict[str, dict[int, dict[int, str]]]:
    """'nl-head-kd-k1-s2' ... -> {variant: {K: {seed: run name}}}; a name that is not NAME-kK-sS exits in one line."""
    runs: dict[str, dict[int, dict[int, str]]] = {}
    for name in names:
        variant, _, pair = name.rpartition("-k")
        k, _, seed = pair.partition("-s")
        if not variant or not k.isdigit() or not seed.isdigit():
            sys.exit(f"error: --variants {name!r}: want VARIANT-kK-sS, VARIANT one of the recipe's recipe.variants")
        runs.setdefault(variant, {}).setdefault(int(k), {})[int(seed)] = name
    return runs


def collect(eval_dir: Path, shots: list[int], seeds: list[int], baselines: list[str] = (), variants: list[str] = ()) -> dict:
    """Every number of the table, read from --eval: `rows` (row name -> {K: [top-1 per seed that ran]}), the
    zero-shot teacher's top-1 and cache-info, the students' evaluate JSONs per kind and K, the Tip-Adapter-F
    top-1 per K and seed, and the baseline runs by method."""
    runs = baseline_runs(list(baselines))
    base = {}  # row name -> {K: [top-1 per seed that ran]}
    for method, by_k in runs.items():
        row = BASELINE_ROWS[method]
        if method == "kd":  # no labels: the per-seed runs stand under every K
            per_seed = {s: name for k_runs in by_k.values() for s, name in k_runs.items()}
            values = [_read_json(eval_dir / f"{per_seed[s]}.json")["combined"]["top1"] for s in sorted(per_seed)]
            base[row] = {k: values for k in shots}
        else:
            base[row] = {k: [_read_json(eval_dir / f"{name}.json")["combined"]["top1"] for _, name in sorted(by_k.get(k, {}).items())]
                         for k in shots}
    pairs = {k: [f"k{k}-s{s}" for s in seeds] for k in shots}
    student = {kind: {k: [_read_json(eval_dir / f"{kind}-{p}.json") for p in pairs[k]] for k in shots} for kind in ("zs", "fs")}
    tip = {k: [_agreement(_read_json(eval_dir / f"teacher-fs-{p}.json")) for p in pairs[k]] for k in shots}
    zs_info = _read_json(eval_dir / "teacher-zs.json")
    rows = {
        "DHO": {k: [r["combined"]["top1"] for r in student["zs"][k]] for k in shots},
        "DHO-F": {k: [r["combined"]["top1"] for r in student["fs"][k]] for k in shots},
        HEAD_ROWS["ce_head"]: {k: [r["ce_head"]["top1"] for r in student["zs"][k]] for k in shots},  # Fig. 8's ablations:
        HEAD_ROWS["kd_head"]: {k: [r["kd_head"]["top1"] for r in student["zs"][k]] for k in shots},  # one head of DHO's model
        "Tip-Adapter-F teacher": {k: [x for x in tip[k] if x is not None] for k in shots},
        **base,
    }
    vruns = variant_runs(list(variants))
    for variant, by_k in vruns.items():  # Table 14: DHO with the variant's heads, alpha/beta chosen on val like DHO
        rows[variant_row(variant)] = {k: [_read_json(eval_dir / f"{name}.json")["combined"]["top1"] for _, name in sorted(by_k.get(k, {}).items())]
                                      for k in shots}
    return {"rows": rows, "zs_teacher": _agreement(zs_info), "zs_info": zs_info, "student": student, "tip": tip, "runs": runs,
            "variants": vruns}


def paper_rows(recipe: dict, methods=(), variants=()) -> dict[str, dict]:
    """Row name -> {"Kshot": the paper's top-1} from the recipe's `expected:` (DHO, DHO-F, Tip-Adapter-F, baselines)."""
    expected = recipe.get("expected", {})
    paper = {"DHO": expected.get("top1", {}), "DHO-F": expected.get("dho_f", {}), "Tip-Adapter-F teacher": expected.get("tip_adapter_f", {})}
    for method in methods:
        paper[BASELINE_ROWS[method]] = (expected.get("baselines") or {}).get(method, {})
    for variant in variants:
        paper[variant_row(variant)] = (expected.get("variants") or {}).get(variant, {})
    return {name: values or {} for name, values in paper.items()}


def results_json(dataset: str, recipe_path: Path, shots: list[int], seeds: list[int], got: dict) -> dict:
    """The numbers of one dataset's table as JSON (FS_WORK/results.json), what `report_all.py` averages."""
    return {"dataset": dataset, "recipe": str(recipe_path), "shots": shots, "seeds": seeds,
            "rows": {name: {str(k): v for k, v in by_k.items()} for name, by_k in got["rows"].items()},
            "zero_shot_teacher": got["zs_teacher"], "teacher": got["zs_info"].get("teacher", {}),
            "baselines": {m: {str(k): {str(s): n for s, n in ks.items()} for k, ks in by_k.items()} for m, by_k in got["runs"].items()}}


def build_table(eval_dir: Path, recipe: dict, dataset: str, shots: list[int], seeds: list[int], smoke: bool,
                baselines: list[str] = (), got: dict | None = None) -> str:
    expected = recipe.get("expected", {})
    got = got or collect(eval_dir, shots, seeds, baselines)
    runs, student, tip, zs_info, zs_teacher, ours = got["runs"], got["student"], got["tip"], got["zs_info"], got["zs_teacher"], got["rows"]
    paper = paper_rows(recipe, runs, got.get("variants", {}))
    averaged = recipe.get("recipe", {}).get("paper_average")
    lines = []
    if smoke:
        lines += [
            f"# SMOKE RUN of `make reproduce-fewshot` on generated {dataset} (paper Fig. 5 / Table 1 layout)",
            "",
            "**Smoke numbers**: a random-init tiny CLIP and a tiny student on a few colour classes, a few epochs on CPU.",
            "They check the pipeline end to end; they say nothing about DHO. The `recorded` columns are the",
            "smoke recipe's stored numbers (`expected:`), not the paper's.",
        ]
    else:
        lines += [f"# Few-shot semi-supervised on {dataset}: reproduction", ""]
        lines += [
            f"Top-1 (%) on {dataset} test, mean ± std over seeds {', '.join(map(str, seeds))} "
            f"(each seed: its own K-shot split, few-shot validation split and student)."
        ]
        if averaged:
            lines += [f"Paper columns: {averaged} — not this dataset's own number, which the paper only plots."]
        if expected.get("plotted_only"):
            lines += [f"Paper columns: empty — the paper prints no number for this setting, it only plots it "
                      f"({expected['plotted_only']})."]
    theirs_name = "recorded" if smoke else "paper"
    cols = "".join(f" {k}-shot ours | {k}-shot {theirs_name} | Δ |" for k in shots)
    lines += ["", f"| method |{cols}", "|---|" + "---|---|---|" * len(shots)]
    for name in ("DHO", *(variant_row(v) for v in got.get("variants", {})), "DHO-F",
                 *(BASELINE_ROWS[m] for m in BASELINE_ROWS if m in runs), "Tip-Adapter-F teacher"):
        cells = ""
        for k in shots:
            theirs = paper[name].get(f"{k}shot")
            values = ours[name][k]
            cells += f" {_fmt_ms(values) if values else '–'} | {_fmt(theirs)} | {_delta(values, theirs)} |"
        lines.append(f"| {name} |{cells}")
    theirs = (expected.get("teacher") or {}).get("top1")
    zs_cells = f" {_fmt(zs_teacher)} | {_fmt(theirs)} | {_delta([zs_teacher] if zs_teacher is not None else None, theirs)} |"
    lines.append(f"| zero-shot teacher |{zs_cells * len(shots)}")
    teacher = zs_info.get("teacher", {})
    lines += [
        "",
        f"DHO: the student distilled from the zero-shot teacher ({teacher.get('model', '?')} / "
        f"{teacher.get('pretrained', '?')}, {zs_info.get('agreement_count', '?')} test images, center view).",
        "DHO-F: the student distilled from Tip-Adapter-F, fitted on the same K-shot split (the paper's few-shot teacher).",
    ]
    if runs:
        ran = {BASELINE_ROWS[m]: sorted({s for k_runs in by_k.values() for s in k_runs}) for m, by_k in runs.items()}
        lines += [
            "Baselines (single head, `dho distill --method`, from the zero-shot teacher; the head they trained): "
            + "; ".join(f"{row} on seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}" for row, s in ran.items())
            + (". KD uses no labels: one run per seed, shown under every K (the paper's 0-shot column)." if "kd" in runs else ".")
            + " A `–` cell: no baseline run at that K (SMOKE runs the first K and seed only).",
        ]
    lines += [
        "",
        "## Runs",
        "",
        "| K | seed | teacher | ce_head | kd_head | combined | alpha | beta | Tip-Adapter-F top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in shots:
        for i, s in enumerate(seeds):
            for kind, name in (("zs", "zero-shot"), ("fs", "Tip-Adapter-F")):
                r = student[kind][k][i]
                lines.append(
                    f"| {k} | {s} | {name} | {_fmt(r['ce_head']['top1'])} | {_fmt(r['kd_head']['top1'])} | "
                    f"{_fmt(r['combined']['top1'])} | {r['alpha']:g} | {r['beta']:g} | "
                    f"{_fmt(tip[k][i]) if kind == 'fs' else ''} |"
                )
    for method, by_k in runs.items():
        for k, k_runs in sorted(by_k.items()):
            for s, name in sorted(k_runs.items()):
                r = _read_json(eval_dir / f"{name}.json")
                lines.append(f"| {k} | {s} | {BASELINE_ROWS[method]} | {_fmt(r['ce_head']['top1'])} | {_fmt(r['kd_head']['top1'])} | "
                             f"{_fmt(r['combined']['top1'])} | {r['alpha']:g} | {r['beta']:g} | |")
    return "\n".join(lines) + "\n"


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split()]
    except ValueError:
        sys.exit(f"error: --{what} {text!r}: give whole numbers separated by spaces, e.g. --{what} '1 2 4'")
    if not values:
        sys.exit(f"error: --{what} is empty: give at least one number")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", type=Path, required=True, help="Folder of the evaluate / cache-info JSON files.")
    parser.add_argument("--recipe", type=Path, required=True, help="The recipe (its `expected:` holds the paper's numbers).")
    parser.add_argument("--dataset", required=True, help="The dataset's name, for the title.")
    parser.add_argument("--shots", required=True, help="Space-separated K, e.g. '1 2 4 8 16'.")
    parser.add_argument("--seeds", required=True, help="Space-separated seeds, e.g. '1 2 3'.")
    parser.add_argument("--baselines", default="", help="Space-separated baseline runs METHOD-kK-sS (their eval JSON in --eval).")
    parser.add_argument("--variants", default="", help="Space-separated variant runs VARIANT-kK-sS (Table 14; their eval JSON in --eval).")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write.")
    parser.add_argument("--smoke", action="store_true", help="Title the table as a smoke run.")
    parser.add_argument("--json-out", type=Path, default=None, help="Also write the table's numbers as JSON (report_all.py reads it).")
    args = parser.parse_args()
    if not args.recipe.is_file():
        sys.exit(f"error: recipe {args.recipe} not found; pass FS_RECIPE=pipelines/fewshot/<recipe>.yaml")
    recipe = yaml.safe_load(args.recipe.read_text(encoding="utf-8"))
    shots, seeds = _ints(args.shots, "shots"), _ints(args.seeds, "seeds")
    got = collect(args.eval, shots, seeds, args.baselines.split(), args.variants.split())
    table = build_table(args.eval, recipe, args.dataset, shots, seeds, args.smoke, args.baselines.split(), got=got)
    if args.json_out is not None:
        write_text_atomic(args.json_out, json.dumps(results_json(args.dataset, args.recipe, shots, seeds, got), indent=1) + "\n")
    write_table(args.out, table)


if __name__ == "__main__":
    main()
