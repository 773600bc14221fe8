"""`make reproduce-frozen SMOKE=1`: Table 13's Make graph end to end on tiny data, then its resume logic.

One run (a few minutes on 2 cores) builds WORK/table13.md from the low-shot smoke data and eval-ood's smoke sets with
the tiny open_clip CLIP as teacher and frozen student: 8 rows (linear evaluation, VPT, CoOp, PromptSRC; each without a
teacher and with DHO), each evaluated on val, V2, Sketch, R, A at alpha 0.5 / beta 1.0. Every row of the table holds
numbers beside the paper's, each run was made with its row's options on the frozen tower, and a second `make` does
nothing (no stage runs, no artefact's mtime changes, `make -q` says up to date).

The test runs make with this interpreter's venv (VENV=sys.prefix) and `-o VENV/.installed`: `setup` never runs.
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

ROOT = Path(__file__).resolve().parents[1]
LOWSHOT = ROOT / "pipelines" / "lowshot"
SETS = ("val", "v2", "sketch", "r", "a")

pytestmark = pytest.mark.slow


def _make(work: Path, *targets: str, question: bool = False) -> subprocess.CompletedProcess:
    venv = Path(sys.prefix)
    assert (venv / "bin" / "dho").exists(), f"{venv}/bin/dho missing: install the project into this venv (make setup)"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = ["make", "-q" if question else "-j2", "-o", f"{venv}/.installed", "SMOKE=1", f"WORK={work}", f"VENV={venv}", *targets]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _artefacts(work: Path) -> dict[str, float]:
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in sorted(work.rglob("*")) if p.is_file()}


def test_reproduce_frozen_smoke_then_nothing(tmp_path):
    work = tmp_path / "work"
    first = _make(work, "reproduce-frozen")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    smoke = yaml.safe_load((LOWSHOT / "frozen-smoke.yaml").read_text())
    rows = smoke["recipe"]["rows"]
    paper = yaml.safe_load((LOWSHOT / "frozen-clip-l14.yaml").read_text())["expected"]["table13"]
    table = (work / "table13.md").read_text()
    assert table.startswith("# SMOKE RUN of `make reproduce-frozen`") and "alpha = 0.5, beta = 1.0" in table
    cells = {}
    for line in table.splitlines():
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(parts) == 9 and parts[0] != "row":
            cells[parts[0].split(" (")[0]] = parts[3:]
    assert set(cells) == {*rows, "CLIP zero-shot", "zero-shot teacher tiny-clip / smoke-teacher.pt"}, table
    for name in [*rows, "CLIP zero-shot"]:
        want = paper["clip-zero-shot" if name == "CLIP zero-shot" else name]
        ours, theirs = zip(*(c.split(" / ") for c in cells[name]))
        assert all(re.fullmatch(r"\d+\.\d", c) for c in ours), (name, ours)  # every row ran: no "not run"
        assert [float(t) for t in theirs[:5]] == want and float(theirs[5]) == pytest.approx(sum(want[1:]) / 4, abs=0.051)
        if name in rows:
            for s, o in zip(SETS, ours):
                result = json.loads((work / "ood" / "eval" / f"frozen-{name}.a0.5-b1.0" / f"{s}.json").read_text())
                assert float(o) == pytest.approx(result["combined"]["top1"], abs=0.051)
                assert (result["alpha"], result["beta"]) == (0.5, 1.0)
                assert result["num_classes"] == (3 if s in ("r", "a") else 4)  # R and A: 3 of the 4 classes
    left = [r for r in paper if r not in rows and r != "clip-zero-shot"]
    assert f"Paper rows not in frozen-smoke.yaml: {', '.join(left)}." in table

    # each run: the frozen tower, its row's options, the stand-in pretrained weights, its unlabeled stream
    for name, row in rows.items():
        config = json.loads((work / "runs" / f"frozen-{name}" / "config.json").read_text())
        assert config["freeze_backbone"] is True and config["student_pretrained"] == str(work / "ood" / "smoke-student.pt")
        assert all(config[k] == v for k, v in row["overrides"].items()), name
        unl = f"train-{row['split']}" if row["unlabeled"] == "labeled" else "train"
        assert Path(config["unlabeled"]) == work / "data" / unl
    for split in smoke["recipe"]["splits"]:  # the stored numbers of the first row on each split
        first = next(n for n, r in rows.items() if r["split"] == split)
        lines = (work / "runs" / f"frozen-{first}" / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]
        assert losses[0] == pytest.approx(smoke["expected"]["loss_step1"][split], abs=1e-3)
        val = json.loads((work / "ood" / "eval" / f"frozen-{first}.a0.5-b1.0" / "val.json").read_text())
        assert abs(val["combined"]["top1"] - smoke["expected"]["top1"][split]) <= 12.5 + 0.051  # two of the 16 images
    assert json.loads((work / "data" / "train-4shot" / "manifest.json").read_text())["num_samples"] == 16  # 4 shots x 4

    # ---- rerun: nothing to do
    before = _artefacts(work)
    second = _make(work, "reproduce-frozen")
    assert second.returncode == 0, second.stderr
    stages = [line for line in second.stdout.splitlines() if line.startswith("== ")]
    assert stages == [f"== table: {work}/table13.md"], second.stdout
    assert _artefacts(work) == before
    assert _make(work, str(work / "table13.md"), question=True).returncode == 0
