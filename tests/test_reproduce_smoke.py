"""`make reproduce-lowshot SMOKE=1`: the real Make graph end to end on tiny data, then its resume logic.

One run (about a minute on 2 cores) builds the table from a generated ImageNet-shaped folder with
tiny random-init open_clip models on CPU; the numbers (center view and random crops) are compared
with the smoke recipe's stored ones. A second `make` must do nothing (no stage runs, no artefact's mtime changes, `make -q` says
up to date). Then one run loses its model.pt and evaluation: the third `make` resumes only that
run from its checkpoint and rebuilds only what depends on it.

The test runs make with this interpreter's venv (VENV=sys.prefix) and `-o VENV/.installed`, so
the `setup` stage (pip) is never re-run from a test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dho import data

ROOT = Path(__file__).resolve().parents[1]
LOWSHOT = ROOT / "pipelines" / "lowshot"
STUDENTS = ("vit-b16", "vit-l14")
SPLITS = ("1pct", "10pct")

pytestmark = pytest.mark.slow


def _make(work: Path, *targets: str, question: bool = False) -> subprocess.CompletedProcess:
    venv = Path(sys.prefix)
    assert (venv / "bin" / "dho").exists(), f"{venv}/bin/dho missing: install the project into this venv (make setup)"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = ["make", "-q" if question else "-j2", "-o", f"{venv}/.installed",
           "SMOKE=1", f"WORK={work}", f"VENV={venv}", *targets]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _artefacts(work: Path) -> dict[str, float]:
    """mtime of every file the stages produce (the smoke inputs included)."""
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in sorted(work.rglob("*")) if p.is_file()}


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| DHO (") or line.startswith("| zero-shot teacher |"):
            rows[f"{cells[0]} {cells[1]}"] = cells[3:]
    return rows


def test_reproduce_lowshot_smoke_then_nothing_then_resume(tmp_path):
    work = tmp_path / "work"
    first = _make(work, "reproduce-lowshot")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    # ---- the table: rows, numeric cells, the smoke run's stored numbers, the paper's numbers
    smoke = yaml.safe_load((LOWSHOT / "smoke.yaml").read_text())["expected"]
    table = (work / "table.md").read_text()
    assert table.startswith("# SMOKE RUN") and "Smoke numbers" in table
    rows = _table_rows(table)
    assert sorted(rows) == ["DHO (center view) ViT-B/16", "DHO (center view) ViT-L/14", "DHO (random crops) ViT-B/16",
                            "DHO (random crops) ViT-L/14", "zero-shot teacher DFN ViT-H/14 (zero-shot)"]
    assert "over 2 draws, seed 0 (`dho evaluate --views random`)" in table
    for name, cells in rows.items():
        assert len(cells) == 3 * len(SPLITS)
        assert all(re.fullmatch(r"[+-]?\d+\.\d", c) for c in cells), f"{name}: non-numeric cells {cells}"
    for student in STUDENTS:
        paper = yaml.safe_load((LOWSHOT / f"{student}.yaml").read_text())["expected"]
        for view, suffix, stored in (("center view", "", smoke["top1"]), ("random crops", ".random", smoke["top1_random_crops"])):
            cells = rows[f"DHO ({view}) {paper['architecture']}"]
            for i, split in enumerate(SPLITS):
                ours, theirs, delta = (float(c) for c in cells[3 * i: 3 * i + 3])
                result = json.loads((work / "eval" / f"{student}-{split}{suffix}.json").read_text())
                assert ours == pytest.approx(result["combined"]["top1"], abs=0.051) and theirs == paper["top1"][split]
                assert delta == pytest.approx(ours - theirs, abs=0.101)  # each cell rounded on its own
                # trained numbers: another CPU may flip a near-tied prediction of these random-init models,
                # so the stored value holds within two of the 16 images, not digit for digit
                assert abs(ours - stored[split]) <= 12.5 + 0.051
                assert result["num_samples"] == 16 and result["num_classes"] == 4
                assert (result["alpha"], result["beta"]) == (0.5, 0.5)
                if suffix:  # the Makefile's EVAL_DRAWS=2 (SMOKE) draws, seed 0; their mean
                    assert (result["views"], result["draws"], result["seed"], len(result["per_draw"])) == ("random", 2, 0, 2)
                    assert result["combined"]["top1"] == pytest.approx(sum(p["combined"]["top1"] for p in result["per_draw"]) / 2)
                else:
                    assert "views" not in result  # the center view's output is as it always was
    teacher_cells = rows["zero-shot teacher DFN ViT-H/14 (zero-shot)"]
    assert abs(float(teacher_cells[0]) - smoke["teacher"]["top1"]) <= 12.5 + 0.051 and float(teacher_cells[1]) == 84.4

    # ---- the training runs: stored first-step losses; both student slots ran the same smoke config
    for split in SPLITS:
        losses = []
        for student in STUDENTS:
            lines = (work / "runs" / f"{student}-{split}" / "metrics.jsonl").read_text().splitlines()
            losses.append([json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)])
        assert losses[0][0] == pytest.approx(smoke["loss_step1"][split], abs=1e-3)
        assert losses[0] == losses[1], "the same config on the same data must give the same losses"
    labeled = {s: json.loads((work / "data" / f"train-{s}" / "manifest.json").read_text())["num_samples"] for s in SPLITS}
    assert labeled == {"1pct": 4, "10pct": 5}  # 1% and 10% of 48, at least one per class
    # labeled caches get the views the schedule needs: ceil(6 steps x 8 / n_labeled / max_labeled_reuse 4) = 3
    for split in SPLITS:
        assert json.loads((work / "cache" / f"train-{split}.zarr" / "zarr.json").read_text())["attributes"]["num_views"] == 3
    config = json.loads((work / "runs" / "vit-b16-1pct" / "config.json").read_text())
    assert (config["lr_schedule"], config["unlabeled_pool"], config["vlm_heads"]) == ("reference", "exclude-labeled", "reference")
    ids, names = zip(*(line.split("\t") for line in (work / "classnames.txt").read_text().splitlines()))
    assert list(names) == list(ids) == ["blue", "green", "red", "yellow"]  # folder<TAB>name; plain folders name themselves
    names = list(names)
    assert json.loads((work / "data" / "train" / "manifest.json").read_text())["classnames"] == names

    # ---- rerun: nothing to do
    before = _artefacts(work)
    second = _make(work, "reproduce-lowshot")
    assert second.returncode == 0, second.stderr
    stages = [line for line in second.stdout.splitlines() if line.startswith("== ")]
    assert stages == [f"== table: {work}/table.md"], second.stdout
    assert _artefacts(work) == before
    assert _make(work, str(work / "table.md"), question=True).returncode == 0

    # ---- one run lost its model and evaluation: only that run resumes (from checkpoints/last.pt)
    run = work / "runs" / "vit-l14-10pct"
    evals = [work / "eval" / f"vit-l14-10pct{suffix}.json" for suffix in ("", ".random")]
    old_evals = [json.loads(e.read_text()) for e in evals]
    (run / "model.pt").unlink()
    for e in evals:
        e.unlink()
    third = _make(work, "reproduce-lowshot")
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    stages = [line.split(" -> ")[0] for line in third.stdout.splitlines() if line.startswith("== ")]
    evaluate = f"== evaluate {work}/runs/vit-l14-10pct on {work}/data/val"
    assert stages[0] == "== distill vit-l14 on the 10pct labels" and stages[3:] == ["== report", f"== table: {work}/table.md"]
    assert sorted(stages[1:3]) == [evaluate, f"{evaluate}, random crops (2 draws, seed 0)"], third.stdout  # make -j2: any order
    assert "--resume" in third.stdout
    assert [json.loads(e.read_text()) for e in evals] == old_evals
    after = _artefacts(work)
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert all(k.startswith(("runs/vit-l14-10pct", "eval/vit-l14-10pct.json", "eval/vit-l14-10pct.random.json", "table.md"))
               for k in changed), changed


    # ---- eval-ood on the finished run: V2/Sketch/R/A-shaped sets as distributed, the Tables 11-12 row
    ood = _make(work, "eval-ood")
    assert ood.returncode == 0, ood.stdout[-4000:] + ood.stderr[-4000:]
    # Eq. 11 at the paper's alpha = 0.5, beta = 1.0 (Tables 11-13) by default, named in the files and the table
    table = (work / "ood" / "vit-b16-1pct.a0.5-b1.0.md").read_text()
    assert "DHO rows: Eq. 11 with alpha = 0.5, beta = 1 " in table
    header, _, dho_row, teacher_row, zs_row = [line for line in table.splitlines() if line.startswith("|")][:5]
    assert header.split("|")[2:-1] == [" Val ", " V2 ", " Sketch ", " R ", " A ", " mean (V2, Sketch, R, A) "]
    cells = [float(c) for c in dho_row.strip("|").split("|")[1:]]
    sets = ("val", "v2", "sketch", "r", "a")
    res = {s: json.loads((work / "ood" / "eval" / "vit-b16-1pct.a0.5-b1.0" / f"{s}.json").read_text()) for s in sets}
    assert all((r["alpha"], r["beta"]) == (0.5, 1.0) for r in res.values())
    assert cells[:5] == pytest.approx([res[s]["combined"]["top1"] for s in res], abs=0.051)
    assert cells[5] == pytest.approx(sum(cells[1:5]) / 4, abs=0.051)
    lowshot = json.loads((work / "eval" / "vit-b16-1pct.json").read_text())  # the heads alone do not depend on alpha/beta
    assert all(res["val"][k] == lowshot[k] for k in ("ce_head", "kd_head", "num_samples"))
    # the zero-shot student row: caches made with the student's own tiny CLIP (smoke: a saved random-init checkpoint)
    assert zs_row.startswith("| zero-shot student tiny-clip / smoke-student.pt, before distillation (ours) |")
    student = {s: json.loads((work / "ood" / "eval" / "student-vit-b16-1pct" / f"{s}.json").read_text()) for s in sets}
    assert [float(c) for c in zs_row.strip("|").split("|")[1:6]] == \
        pytest.approx([100 * student[s]["agreement"] for s in sets], abs=0.051)
    assert all(Path(student[s]["teacher"]["pretrained"]).name == "smoke-student.pt" for s in sets)
    assert student["r"]["num_classes"] == 3
    # ALPHA=run BETA=run: the run's own mix, in files of their own (the lowshot evaluation's numbers exactly)
    own = work / "ood" / "eval" / "vit-b16-1pct.arun-brun" / "val.json"
    assert _make(work, str(own), "ALPHA=run", "BETA=run").returncode == 0
    own = json.loads(own.read_text())
    assert all(own[k] == lowshot[k] for k in ("ce_head", "kd_head", "combined", "alpha", "beta", "num_samples"))
    # V2's folders 0..3 are class indices; R and A keep 3 of the 4 classes and are scored on those
    v2 = json.loads((work / "ood" / "data" / "v2" / "manifest.json").read_text())
    assert v2["classnames"] == names
    v2_ds = data.Dataset.open(work / "ood" / "data" / "v2")
    assert all(names[lab] == names[int(key.split("/")[0])] for key, lab in zip(v2_ds.keys, v2_ds.labels.tolist()))
    for subset, kept in (("r", [0, 1, 3]), ("a", [0, 2, 3])):
        manifest = json.loads((work / "ood" / "data" / subset / "manifest.json").read_text())
        assert manifest["classnames"] == [names[i] for i in kept] and manifest["class_subset_of"]["indices"] == kept
        assert (res[subset]["num_classes"], res[subset]["model_classes"], res[subset]["class_subset"]) == (3, 4, True)
        cache = json.loads((work / "ood" / "eval" / "teacher" / f"{subset}.json").read_text())
        assert cache["num_classes"] == 3  # the teacher is prompted with the subset's classes only
    assert "zero-shot teacher tiny-clip (ours)" in teacher_row
