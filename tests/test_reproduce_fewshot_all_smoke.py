"""`make reproduce-fewshot-all SMOKE=1`: the all-datasets graph end to end on three generated datasets.

Two of the ten (Oxford Pets, EuroSAT) and ImageNet, each generated in CoOp's layout with its own data seed,
SHOTS="1 2", one seed, the CE+KD baseline on every (K, seed) and the gradient diagnostics every step (a few
minutes on 2 cores). Checked: each dataset's own reproduce-fewshot folder and results.json, the averages
of table.md against the per-dataset numbers they come from, the figures as PNGs, and a second `make` that
runs no dataset work again.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("oxford_pets", "eurosat", "imagenet")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # ~5 min alone on 2 cores, more beside the other slow tests


def _make(work: Path) -> subprocess.CompletedProcess:
    venv = Path(sys.prefix)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["make", "-j2", "-o", f"{venv}/.installed", "SMOKE=1", f"FS_ALL_WORK={work}", f"VENV={venv}",
                           "reproduce-fewshot-all"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def _cells(table: str, row: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip().strip("|").split("|")][1:]


def test_reproduce_fewshot_all_smoke_averages_figures_and_rerun(tmp_path):
    work = tmp_path / "all"
    first = _make(work)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    results = {d: json.loads((work / d / "results.json").read_text()) for d in DATASETS}
    for d, r in results.items():
        assert (work / d / "table.md").read_text().startswith("# SMOKE RUN")
        assert (r["dataset"], r["shots"], r["seeds"]) == (d, [1, 2], [1])
        assert sorted(r["rows"]) == ["CE+KD (logit)", "DHO", "DHO (h_CE)", "DHO (h_KD)", "DHO-F", "Tip-Adapter-F teacher"]
        assert all(len(r["rows"]["CE+KD (logit)"][k]) == 1 for k in ("1", "2"))  # the baseline on every (K, seed)
        evaluated = json.loads((work / d / "eval" / "zs-k2-s1.json").read_text())
        assert r["rows"]["DHO"]["2"] == [evaluated["combined"]["top1"]] and r["rows"]["DHO (h_KD)"]["2"] == [evaluated["kd_head"]["top1"]]
        diag = [json.loads(line) for line in (work / d / "runs" / "ce+kd-k2-s1" / "metrics.jsonl").read_text().splitlines()]
        steps = [x["step"] for x in diag if "grad_cosine" in x]
        assert steps == list(range(1, max(x["step"] for x in diag) + 1))  # LOG_GRAD_COSINE=1
    data = {d: json.loads((work / d / "data" / "train" / "manifest.json").read_text())["fingerprint"] for d in DATASETS}
    assert len(set(data.values())) == 3, "each dataset generated with its own seed"

    table = (work / "table.md").read_text()
    assert table.startswith("# SMOKE RUN of `make reproduce-fewshot-all`")
    assert "10-dataset average: over 2 of the ten (Pets, EuroSAT); 11-dataset average: over 3 of the eleven" in table
    for row in ("DHO", "DHO-F", "CE+KD (logit)"):
        cells = _cells(table, row)
        for i, k in enumerate(("1", "2")):
            ten = statistics.fmean(results[d]["rows"][row][k][0] for d in ("oxford_pets", "eurosat"))
            eleven = statistics.fmean(results[d]["rows"][row][k][0] for d in DATASETS)
            assert cells[6 * i:6 * i + 6] == [f"{ten:.1f}", "–", "–", f"{eleven:.1f}", "–", "–"], (row, k, cells)
    assert "| DHO | " in table.split("## Gradient conflict")[1] and "| CE+KD (logit) | " in table.split("## Gradient conflict")[1]
    for name in ("accuracy_vs_shots.png", "teachers.png", "largest_k.png", "grad_conflict.png"):
        with Image.open(work / "figures" / name) as image:
            assert image.format == "PNG" and image.size[0] > 800

    second = _make(work)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    stages = [line.split(" (")[0].split(" -> ")[0] for line in second.stdout.splitlines() if line.startswith("== ")]
    assert stages == [*(s for d in DATASETS for s in (f"== dataset {d}", "== table: " + str(work / d / "table.md"))), "== report"]
    assert (work / "table.md").read_text() == table
