"""The last stage of `make reproduce-lowshot`: our top-1 next to the paper's Table 4, as Markdown.

    python pipelines/lowshot/report.py --eval runs/lowshot/eval --runs runs/lowshot/runs \
        --students "vit-b16 vit-l14" --splits "1pct 10pct" --out runs/lowshot/table.md [--smoke]

Reads `EVAL/<student>-<split>.json` (the output of `dho evaluate --json`: the center view),
`EVAL/<student>-<split>.random.json` (`dho evaluate --views random --draws N --json`: random crops,
as the reference's train_imgnet_semi.py scored its test set), `EVAL/teacher.json` (`dho cache-info
--json` of the validation cache: the teacher's zero-shot top-1 is its label agreement on the center
view) and, for the paper's numbers, the `expected:` section of `pipelines/lowshot/<student>.yaml` (or of the
recipe `--recipe STUDENT=PATH` names: `make reproduce-lowshot TEACHER=clip-l14`; its `expected.table` titles the table).
Each student has two rows, one per view, each against the paper. Writes the table to --out
(atomically) and prints it.
With --smoke the same layout is titled as a smoke run: tiny random models on a few colour
classes, whose numbers check the plumbing, not the method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tables import fmt, read_json, write_table  # noqa: E402

HERE = Path(__file__).parent
SPLIT_TITLES = {"1pct": "1%", "10pct": "10%"}
VIEW_ROWS = (("", "DHO (center view)"), (".random", "DHO (random crops)"))  # (eval file suffix, method cell)


def _read_json(path: Path) -> dict:
    return read_json(path, "reproduce-lowshot")


def paper_numbers(student: str, recipes: dict[str, Path] | None = None) -> dict:
    """The `expected:` section of the student's recipe: `recipes[student]`, else pipelines/lowshot/<student>.yaml."""
    path = (recipes or {}).get(student) or HERE / f"{student}.yaml"
    if not path.is_file():
        sys.exit(f"error: no recipe {path} for student {student!r}; students are named after pipelines/lowshot/*.yaml")
    return yaml.safe_load(path.read_text(encoding="utf-8"))["expected"]


_fmt = fmt


def _delta(ours: float | None, paper: float | None) -> str:
    return "–" if ours is None or paper is None else f"{ours - paper:+.1f}"


def build_table(eval_dir: Path, runs_dir: Path, students: list[str], splits: list[str], smoke: bool,
                recipes: dict[str, Path] | None = None) -> str:
    """The Markdown report: main table (combined head vs paper) + per-run details."""
    papers = {student: paper_numbers(student, recipes) for student in students}
    tables = sorted({p.get("table", "Table 4") for p in papers.values()})
    cols = "".join(f" {SPLIT_TITLES.get(s, s)} ours | {SPLIT_TITLES.get(s, s)} paper | Δ |" for s in splits)
    lines = []
    if smoke:
        lines += [
            "# SMOKE RUN of `make reproduce-lowshot` (paper Table 4 layout)",
            "",
            "**Smoke numbers**: tiny random-init open_clip models on 4 colour classes, 1 epoch on CPU.",
            "They check the pipeline end to end; they say nothing about DHO. The paper columns are the real targets.",
        ]
    else:
        lines += [f"# ImageNet low-shot semi-supervised (paper {', '.join(tables)}): reproduction", ""]
        lines += ["Top-1 (%) on ImageNet val, Eq. 11 with the recipe's alpha, beta. Paper numbers are single runs."]
    lines += ["", f"| method | architecture | params (M) |{cols}", "|---|---|---|" + "---|---|---|" * len(splits)]

    details = []
    teacher_paper = None
    draws = set()
    for student in students:
        paper = papers[student]
        teacher_paper = teacher_paper or paper.get("teacher")
        results = {(split, suffix): _read_json(eval_dir / f"{student}-{split}{suffix}.json")
                   for split in splits for suffix, _ in VIEW_ROWS}
        for suffix, method in VIEW_ROWS:
            cells = ""
            for split in splits:
                ours = results[split, suffix]["combined"]["top1"]
                theirs = paper["top1"].get(split)
                cells += f" {_fmt(ours)} | {_fmt(theirs)} | {_delta(ours, theirs)} |"
            lines.append(f"| {method} | {paper['architecture']} | {paper['params_m']} |{cells}")
        for split in splits:
            if results[split, ".random"].get("views") != "random":
                sys.exit(f"error: {eval_dir / f'{student}-{split}.random.json'} is not a random-crop evaluation "
                         "(`dho evaluate --views random`); delete it and re-run `make reproduce-lowshot`")
            details.append((student, split, results[split, ""], results[split, ".random"]))
            draws.add((results[split, ".random"].get("draws"), results[split, ".random"].get("seed")))

    teacher = _read_json(eval_dir / "teacher.json")
    ours = None if teacher.get("agreement") is None else 100.0 * teacher["agreement"]
    if teacher_paper:
        name, params, theirs = teacher_paper["name"], teacher_paper["params_m"], teacher_paper["top1"]
    else:
        name, params, theirs = teacher["teacher"]["model"], "–", None
    cells = f" {_fmt(ours)} | {_fmt(theirs)} | {_delta(ours, theirs)} |" * len(splits)
    lines.append(f"| zero-shot teacher | {name} | {params} |{cells}")

    drawn = " / ".join(f"{n} draws, seed {seed}" for n, seed in sorted(draws, key=str))
    lines += [
        "",
        "Views: center = open_clip's eval transform (resize the short side, center-crop), the project's default;",
        "random crops = the reference's way (train_imgnet_semi.py built its test set with the training transform:",
        "RandomResizedCrop scale 0.5-1 + flip, one draw per image), here replayed at the student's size and the mean",
        f"over {drawn} (`dho evaluate --views random`). The paper's numbers come from one such draw.",
        "",
        "Zero-shot teacher: no labels, so the same number in every column; it is the teacher's top-1 on the",
        f"center view of the validation cache ({teacher['agreement_count']} images, "
        f"{teacher['teacher']['model']} / {teacher['teacher']['pretrained']}).",
        "",
        "## Runs",
        "",
        "| run | student | ce_head top-1 | kd_head top-1 | combined top-1 | combined top-5 | combined top-1, random crops (sd) "
        "| alpha | beta | val images |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for student, split, r, rnd in details:
        ran = _ran_student(runs_dir / f"{student}-{split}")
        sd = "" if rnd.get("std") is None else f" ({rnd['std']['combined']['top1']:.2f})"
        lines.append(
            f"| {student}-{split} | {ran} | {_fmt(r['ce_head']['top1'])} | {_fmt(r['kd_head']['top1'])} | "
            f"{_fmt(r['combined']['top1'])} | {_fmt(r['combined']['top5'])} | {_fmt(rnd['combined']['top1'])}{sd} | "
            f"{r['alpha']:g} | {r['beta']:g} | {r['num_samples']} |"
        )
    return "\n".join(lines) + "\n"


def _ran_student(run_dir: Path) -> str:
    """The student the run actually trained (its resolved config.json), e.g. the tiny model of a smoke run."""
    config = run_dir / "config.json"
    if not config.is_file():
        return "?"
    cfg = json.loads(config.read_text(encoding="utf-8"))
    pretrained = cfg.get("student_pretrained") or "random init"
    return f"`{cfg['student']}` ({pretrained})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", type=Path, required=True, help="Folder of the evaluate / cache-info JSON files.")
    parser.add_argument("--runs", type=Path, required=True, help="Folder of the run directories (<student>-<split>/).")
    parser.add_argument("--students", required=True, help="Space-separated student names (pipelines/lowshot/<name>.yaml).")
    parser.add_argument("--splits", required=True, help="Space-separated split names, e.g. '1pct 10pct'.")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write.")
    parser.add_argument("--smoke", action="store_true", help="Title the table as a smoke run.")
    parser.add_argument("--recipe", action="append", default=[], metavar="STUDENT=PATH",
                        help="The recipe of a student whose paper numbers are not pipelines/lowshot/<student>.yaml's.")
    args = parser.parse_args()
    recipes = {}
    for item in args.recipe:
        student, sep, path = item.partition("=")
        if not sep or not student or not path:
            sys.exit(f"error: --recipe {item!r}: give STUDENT=PATH, e.g. --recipe vit-b16=pipelines/lowshot/vit-b16-clip-l14.yaml")
        recipes[student] = Path(path)
    table = build_table(args.eval, args.runs, args.students.split(), args.splits.split(), args.smoke, recipes)
    write_table(args.out, table)


if __name__ == "__main__":
    main()
