"""The last stage of `make reproduce-frozen`: the paper's Table 13 (DHO with adaptation methods on a frozen CLIP), as
Markdown: each row of the recipe's `recipe.rows` beside `expected.table13` of frozen-clip-l14.yaml.

    python pipelines/lowshot/frozen_report.py --recipe pipelines/lowshot/frozen-clip-l14.yaml \
        --paper pipelines/lowshot/frozen-clip-l14.yaml --runs runs/lowshot-clip-l14/runs --eval runs/lowshot-clip-l14/ood/eval \
        --mix a0.5-b1.0 --rows "le le-dho" --out runs/lowshot-clip-l14/table13.md [--smoke]

Reads, per row R, `EVAL/frozen-R.MIX/<set>.json` (`dho evaluate --json` on val and V2/Sketch/R/A, as `make eval-ood`
writes them: the combined head, Eq. 11 at the Makefile's alpha/beta) and `RUNS/frozen-R/config.json`, whose values of
the row's overrides must be the row's (a run made with other options is refused: the row would be mislabelled);
`EVAL/teacher/<set>.json` (the teacher's zero-shot top-1, `dho cache-info --json`) and `EVAL/student-frozen/<set>.json`
(the frozen student's own zero-shot classifier: Table 13's "CLIP zero-shot" row). A row of the recipe with no
evaluations (not in ROWS, or not finished) is marked "not run". The OOD mean is over V2, Sketch, R, A.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tables import fmt, read_json, write_table  # noqa: E402

SETS = ("val", "v2", "sketch", "r", "a")
TITLES = ("Val", "V2", "Sketch", "R", "A")
TARGET = "reproduce-frozen"


def _mean(row: list) -> float | None:
    shifted = row[1:]
    return None if None in shifted else sum(shifted) / len(shifted)


def _cells(ours: list | None, paper: list | None) -> str:
    """`ours / paper` per set and for the OOD mean; `not run` where there are no evaluations."""
    paper = list(paper) if paper else [None] * len(SETS)
    if ours is None:
        return " | ".join(f"not run / {fmt(p)}" for p in [*paper, _mean(paper)])
    return " | ".join(f"{fmt(o)} / {fmt(p)}" for o, p in zip([*ours, _mean(ours)], [*paper, _mean(paper)]))


def _row_results(name: str, spec: dict, runs: Path, eval_dir: Path, mix: str, alpha_beta: set) -> list | None:
    """The row's top-1 per set, or None where the row has no complete evaluations."""
    folder = eval_dir / f"frozen-{name}.{mix}"
    if not all((folder / f"{s}.json").is_file() for s in SETS):
        return None
    config = read_json(runs / f"frozen-{name}" / "config.json", TARGET)
    for key, value in (spec.get("overrides") or {}).items():
        key = "lambda_" if key == "lambda" else key
        if config.get(key) != value:
            sys.exit(f"error: {runs / f'frozen-{name}' / 'config.json'}: {key} = {config.get(key)!r}, but Table 13's row "
                     f"{name} needs {value!r}; delete {runs / f'frozen-{name}'} and {folder} and re-run `make {TARGET}`")
    results = [read_json(folder / f"{s}.json", TARGET) for s in SETS]
    alpha_beta |= {(r["alpha"], r["beta"]) for r in results}
    return [r["combined"]["top1"] for r in results]


def _zero_shot(eval_dir: Path, who: str) -> tuple[list | None, str]:
    infos = [read_json(eval_dir / who / f"{s}.json", TARGET) for s in SETS]
    notes = sorted({i["not_applicable"] for i in infos if "not_applicable" in i})
    if notes:
        return None, "; ".join(notes)
    t = infos[0]["teacher"]
    return [None if i["agreement"] is None else 100.0 * i["agreement"] for i in infos], \
        f"{Path(str(t['model'])).stem} / {Path(str(t['pretrained'])).name}"


def build_table(recipe: Path, paper_recipe: Path, runs: Path, eval_dir: Path, mix: str, selected: list[str], smoke: bool) -> str:
    rows = yaml.safe_load(recipe.read_text(encoding="utf-8"))["recipe"]["rows"]
    paper = yaml.safe_load(paper_recipe.read_text(encoding="utf-8"))["expected"]["table13"]
    unknown = [r for r in selected if r not in rows]
    if unknown:
        sys.exit(f"error: rows {unknown} are not in {recipe}'s recipe.rows ({', '.join(rows)})")
    alpha_beta: set = set()
    results = {name: _row_results(name, spec, runs, eval_dir, mix, alpha_beta) for name, spec in rows.items()}
    missing = [r for r in selected if results[r] is None]
    if missing:
        sys.exit(f"error: rows {missing} have no evaluations in {eval_dir}/frozen-ROW.{mix}/; run `make {TARGET}`")
    if len(alpha_beta) > 1:
        sys.exit(f"error: {eval_dir}: the evaluations use different alpha/beta {sorted(alpha_beta)}; delete them and re-run "
                 f"`make {TARGET}`")
    student, student_label = _zero_shot(eval_dir, "student-frozen")
    teacher, teacher_label = _zero_shot(eval_dir, "teacher")

    lines = []
    if smoke:
        lines += [f"# SMOKE RUN of `make {TARGET}` (paper Table 13 layout)", "",
                  "**Smoke numbers**: tiny random-init open_clip models on generated colour images (VPT / PromptSRC depth 2,",
                  "4 shots); they check the graph and that each row ran with its options, not the method. The paper",
                  "column is the real target (frozen CLIP ViT-B/16, CLIP ViT-L/14@336 teacher).", ""]
    else:
        lines += ["# DHO with adaptation methods on a frozen CLIP ViT-B/16 (paper Table 13): reproduction", "",
                  "CLIP ViT-L/14@336 zero-shot teacher; labels: 1% (linear evaluation) or 16 shots per class (the other "
                  "rows); unlabeled: all of train (rows `-dho`) or the labeled split only (`-dho-l`, and the rows without "
                  "a teacher).", ""]
    (a, b), = alpha_beta or {(None, None)}
    mix_line = f"alpha = {a}, beta = {b}" if a is not None else mix
    lines += [f"Top-1 (%), **ours / paper**; DHO rows: Eq. 11 with {mix_line} (Table 13: 0.5 and 1.0); "
              "R and A scored on their 200 classes; mean over V2, Sketch, R, A.", "",
              "| row | labels | unlabeled | " + " | ".join(TITLES) + " | OOD mean |", "|" + "---|" * (len(SETS) + 4)]
    lines.append(f"| CLIP zero-shot (the frozen student{f', {student_label}' if student else ''}) | – | – | "
                 + _cells(student, paper.get("clip-zero-shot")) + " |")
    for name, spec in rows.items():
        unlabeled = "train" if spec["unlabeled"] == "pool" else "labeled only"
        lines.append(f"| {name} | {spec['split']} | {unlabeled} | " + _cells(results[name], paper.get(name)) + " |")
    t_cells = " | ".join(fmt(v) for v in [*(teacher or [None] * len(SETS)), _mean(teacher or [None] * len(SETS))])
    lines.append(f"| zero-shot teacher {teacher_label} (ours only) | – | – | {t_cells} |")
    if student is None:
        lines += ["", f"No CLIP zero-shot row of ours: {student_label}."]
    left = [r for r in paper if r not in rows and r != "clip-zero-shot"]
    if left:
        lines += ["", f"Paper rows not in {recipe.name}: {', '.join(left)}."]
    not_run = [r for r in rows if results[r] is None]
    if not_run:
        lines += ["", f"Not run (ROWS): {', '.join(not_run)}; `make {TARGET} ROWS=all` runs every row."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, required=True, help="The recipe whose recipe.rows were run.")
    parser.add_argument("--paper", type=Path, required=True, help="The recipe holding expected.table13 (the paper's numbers).")
    parser.add_argument("--runs", type=Path, required=True, help="Folder of the frozen-ROW run folders.")
    parser.add_argument("--eval", type=Path, required=True, help="eval-ood's eval folder (frozen-ROW.MIX/, teacher/, student-frozen/).")
    parser.add_argument("--mix", required=True, help="The evaluations' alpha/beta tag, e.g. a0.5-b1.0.")
    parser.add_argument("--rows", required=True, help="The rows this make run selected (space-separated).")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write.")
    parser.add_argument("--smoke", action="store_true", help="Title the table as a smoke run.")
    args = parser.parse_args()
    write_table(args.out, build_table(args.recipe, args.paper, args.runs, args.eval, args.mix, args.rows.split(), args.smoke))


if __name__ == "__main__":
    main()
