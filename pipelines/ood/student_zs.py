"""Which zero-shot CLIP the run's student started from, as `recipe.py run ... precompute` overrides.

    python pipelines/ood/student_zs.py --run runs/lowshot/runs/vit-b16-1pct [--pretrained FILE]
    # prints e.g. `model=ViT-B-16-quickgelu pretrained=openai text_classifier_norm=renormalize`; prints
    # nothing where there is no zero-shot student, and with --note FILE writes {"not_applicable": why} there

Table 12 of the paper compares a distilled CLIP student with the same CLIP before distillation (its own
zero-shot classifier: "ViT-B/16 zero-shot 66.7 / 60.8 / 46.2 / 74.0 / 47.0"). `make eval-ood` makes that
row with `dho precompute-teacher` run with the student's open_clip model and weights, read from
RUN/config.json (`student`, `student_pretrained`): the teacher recipe's templates, one center view, and
CLIP's own classifier rule (the re-normalised template mean, Eq. 1), not the DFN teacher's `mean`. `--pretrained` replaces the weights (the smoke run's random-init student has none:
a saved random-init checkpoint of the same tiny config stands in).

Prints nothing (exit 0) when the student is not an open_clip tower (a torchvision or timm CNN) or has no
pretrained weights: then there is no zero-shot student to compare with, and the table says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def student_zero_shot(run: Path, pretrained: str | None = None) -> tuple[dict | None, str]:
    """(recipe overrides {model, pretrained}, '') for a CLIP student with weights, else (None, why not)."""
    path = run / "config.json"
    if not path.is_file():
        sys.exit(f"error: {path} not found; RUN must be a run folder written by `dho distill`")
    config = json.loads(path.read_text(encoding="utf-8"))
    student = str(config.get("student") or "")
    weights = pretrained or config.get("student_pretrained")
    if student.startswith("timm/"):
        return None, f"the student {student} is a timm model, not a CLIP tower"
    from dho.students import _clip_source

    source = _clip_source(student)
    if source is None:
        return None, f"the student {student} is a CNN, not a CLIP tower"
    if weights in (None, "", "none"):
        return None, f"the student {student} was trained from random init (no student_pretrained)"
    return {"model": source, "pretrained": weights, "text_classifier_norm": "renormalize"}, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="The run folder (written by dho distill).")
    parser.add_argument("--pretrained", default=None, help="Weights to use instead of the run's student_pretrained.")
    parser.add_argument("--note", type=Path, default=None, help="Where there is no zero-shot student: write why (JSON).")
    args = parser.parse_args()
    overrides, why = student_zero_shot(args.run, args.pretrained)
    if overrides is None:
        print(f"no zero-shot student row: {why}", file=sys.stderr)
        if args.note is not None:
            args.note.write_text(json.dumps({"not_applicable": why}) + "\n", encoding="utf-8")
        return
    for value in overrides.values():
        if any(c.isspace() for c in str(value)):
            sys.exit(f"error: {args.run}/config.json: the student's {value!r} holds a space; the Makefile passes it as one word")
    print(" ".join(f"{k}={v}" for k, v in overrides.items()))


if __name__ == "__main__":
    main()
