"""The last stage of `make eval-ood`: a run's top-1 on ImageNet val and its distribution-shifted variants
(the paper's Tables 11-12 layout), beside the zero-shot teacher's, the run's student before distillation
(its own zero-shot CLIP) and the paper's, as Markdown.

    python pipelines/ood/report.py --run runs/lowshot/runs/vit-b16-1pct --ours runs/lowshot/ood/eval/vit-b16-1pct.a0.5-b1.0 \
        --eval runs/lowshot/ood/eval --sets "val v2 sketch r a" --out runs/lowshot/ood/vit-b16-1pct.a0.5-b1.0.md [--smoke]

Reads `OURS/<set>.json` (`dho evaluate --json`: the combined head, Eq. 11 with the alpha/beta the Makefile
passed, by default the paper's alpha = 0.5, beta = 1.0 of Tables 11-13; ImageNet-R/-A are scored on their
200 classes), `EVAL/teacher/<set>.json` (`dho cache-info --json` of the set's center-view cache: the
teacher's zero-shot top-1 is its label agreement; a cache of a class subset prompts only those classes,
which is the same restriction) and `EVAL/student-<run name>/<set>.json` (the same for a cache made with the
run's own student CLIP and weights, or `{"not_applicable": why}` for a CNN student or one trained from random
init). Refuses teacher caches made by another teacher than the one the run was distilled from (its labeled
cache's identity), since the row would compare two teachers, and student caches of another model than the
run's student. The mean is over the four shifted sets (V2, Sketch, R, A).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tables import fmt, read_json, write_table  # noqa: E402

TITLES = {"val": "Val", "v2": "V2", "sketch": "Sketch", "r": "R", "a": "A"}
SHIFTED = ("v2", "sketch", "r", "a")
# Table 12 of the paper (full training, DFN ViT-H/14 teacher): val, V2, Sketch, R, A per recipe run name.
PAPER = {
    "vit-b16-1pct": (81.6, 72.6, 50.6, 65.5, 35.6),
    "vit-b16-10pct": (82.8, 73.6, 50.7, 67.7, 37.8),
    "vit-l14-1pct": (84.6, 77.0, 61.5, 79.9, 60.8),
    "vit-l14-10pct": (85.9, 77.8, 61.7, 82.8, 64.4),
}
PAPER_TEACHER = (83.6, 77.2, 71.7, 92.3, 77.4)  # DFN ViT-H/14 zero-shot, Table 12
# Table 12's zero-shot rows of the students themselves (OpenAI CLIP), by the recipe run's student
PAPER_STUDENT = {
    "vit-b16": ("CLIP ViT-B/16", (66.7, 60.8, 46.2, 74.0, 47.0)),
    "vit-l14": ("CLIP ViT-L/14", (75.3, 68.3, 59.2, 86.5, 74.6)),
}


def _teacher_identity(run: Path) -> dict | None:
    """The teacher identity recorded in the run's labeled cache (None if the run does not name one)."""
    config = read_json(run / "config.json", "eval-ood")
    cache = config.get("labeled_cache")
    attrs = Path(cache or "") / "zarr.json"
    if not cache or not attrs.is_file():
        return None
    return json.loads(attrs.read_text())["attributes"]["teacher"]


def _student_rows(run: Path, eval_dir: Path, sets: list[str]) -> tuple[list | None, str]:
    """(the zero-shot student's top-1 per set, its label) or (None, why there is none)."""
    folder = eval_dir / f"student-{run.name}"
    infos = {s: read_json(folder / f"{s}.json", "eval-ood") for s in sets}
    notes = {info["not_applicable"] for info in infos.values() if "not_applicable" in info}
    if notes:
        return None, "; ".join(sorted(notes))
    student = str(read_json(run / "config.json", "eval-ood").get("student"))
    models = {info["teacher"]["model"] for info in infos.values()}
    if len(models) != 1:
        sys.exit(f"error: {folder}: the zero-shot student caches were made by {sorted(models)}, not one model; "
                 f"delete {folder} and re-run `make eval-ood`")
    model = models.pop()
    if Path(model).stem != Path(student.removeprefix("clip:")).stem:
        sys.exit(f"error: {folder}: its caches were made by {model}, but {run} trained the student {student}; "
                 f"delete {folder} and re-run `make eval-ood`")
    t = next(iter(infos.values()))["teacher"]
    row = [None if infos[s]["agreement"] is None else 100.0 * infos[s]["agreement"] for s in sets]
    return row, f"{Path(t['model']).stem} / {Path(str(t['pretrained'])).name}"


def build_table(run: Path, ours_dir: Path, eval_dir: Path, sets: list[str], smoke: bool) -> str:
    name = run.name
    ours = {s: read_json(ours_dir / f"{s}.json", "eval-ood") for s in sets}
    teacher = {s: read_json(eval_dir / "teacher" / f"{s}.json", "eval-ood") for s in sets}
    mixes = {(r["alpha"], r["beta"]) for r in ours.values()}
    if len(mixes) != 1:
        sys.exit(f"error: {ours_dir}: the evaluations use different alpha/beta {sorted(mixes)}; delete {ours_dir} "
                 "and re-run `make eval-ood`")
    alpha, beta = mixes.pop()
    identity = _teacher_identity(run)
    for s, info in teacher.items():
        t = info["teacher"]
        if identity is not None and t.get("weights_sha256") != identity.get("weights_sha256"):
            sys.exit(f"error: {eval_dir / 'teacher' / (s + '.json')}: its cache was made by {t['model']} / {t['pretrained']}, "
                     f"but {run} was distilled from {identity['model']} / {identity['pretrained']}; make the OOD caches "
                     "with the run's teacher (TEACHER_RECIPE=..., TEACHER_WEIGHTS=...)")
    row_ours = [ours[s]["combined"]["top1"] for s in sets]
    row_teacher = [None if teacher[s]["agreement"] is None else 100.0 * teacher[s]["agreement"] for s in sets]
    row_student, student_label = _student_rows(run, eval_dir, sets)

    def mean(row: list) -> float | None:
        vals = [v for s, v in zip(sets, row) if s in SHIFTED]
        return None if len(vals) != len(SHIFTED) or None in vals else sum(vals) / len(vals)

    head = "| model | " + " | ".join(TITLES.get(s, s) for s in sets) + " | mean (V2, Sketch, R, A) |"
    lines = []
    if smoke:
        lines += ["# SMOKE RUN of `make eval-ood` (paper Tables 11-12 layout)", "",
                  "**Smoke numbers**: tiny random-init models on generated V2/Sketch/R/A-shaped colour images; they check",
                  "the label mapping and the pipeline, not the method.", ""]
    else:
        lines += [f"# {name}: ImageNet and its distribution shifts (paper Tables 11-12)", ""]
    t = next(iter(teacher.values()))["teacher"]
    lines += [f"DHO rows: Eq. 11 with alpha = {alpha:g}, beta = {beta:g} (the paper's Tables 11-13 use 0.5 and 1.0).", "",
              head, "|" + "---|" * (len(sets) + 2),
              f"| DHO {name} (ours) | " + " | ".join(fmt(v) for v in row_ours) + f" | {fmt(mean(row_ours))} |",
              f"| zero-shot teacher {t['model']} (ours) | " + " | ".join(fmt(v) for v in row_teacher) + f" | {fmt(mean(row_teacher))} |"]
    if row_student is not None:
        lines.append(f"| zero-shot student {student_label}, before distillation (ours) | "
                     + " | ".join(fmt(v) for v in row_student) + f" | {fmt(mean(row_student))} |")
    all_sets = ["val", *SHIFTED]
    if name in PAPER and not smoke:
        paper = dict(zip(all_sets, PAPER[name]))
        row = [paper.get(s) for s in sets]
        lines.append(f"| DHO {name} (paper, Table 12) | " + " | ".join(fmt(v) for v in row) + f" | {fmt(mean(row))} |")
    if not smoke:
        paper = dict(zip(all_sets, PAPER_TEACHER))
        row = [None if s == "val" else paper.get(s) for s in sets]  # Table 12 lists no val for zero-shot rows
        lines.append("| zero-shot DFN ViT-H/14 (paper, Table 12) | " + " | ".join(fmt(v) for v in row) + f" | {fmt(mean(row))} |")
        student_key = name.rsplit("-", 1)[0]
        if student_key in PAPER_STUDENT:
            label, values = PAPER_STUDENT[student_key]
            paper = dict(zip(all_sets, values))
            row = [paper.get(s) for s in sets]
            lines.append(f"| zero-shot {label} (paper, Table 12) | " + " | ".join(fmt(v) for v in row) + f" | {fmt(mean(row))} |")
    if row_student is None:
        lines += ["", f"No zero-shot student row: {student_label}."]
    lines += ["", "Samples and classes scored per set:", ""]
    for s in sets:
        r = ours[s]
        of = f" of the model's {r['model_classes']}" if r.get("class_subset") else ""
        lines.append(f"- {TITLES.get(s, s)}: {r['num_samples']} images, {r['num_classes']} classes{of} ({r['data']}); "
                     f"alpha = {r['alpha']:g}, beta = {r['beta']:g}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="The run folder (written by dho distill).")
    parser.add_argument("--ours", type=Path, required=True, help="Folder with the run's <set>.json (dho evaluate --json).")
    parser.add_argument("--eval", type=Path, required=True, help="Folder with teacher/<set>.json and student-<run name>/<set>.json.")
    parser.add_argument("--sets", default="val v2 sketch r a", help="The evaluation sets, in column order.")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write.")
    parser.add_argument("--smoke", action="store_true", help="Title the table as a smoke run.")
    args = parser.parse_args()
    write_table(args.out, build_table(args.run, args.ours, args.eval, args.sets.split(), args.smoke))


if __name__ == "__main__":
    main()
