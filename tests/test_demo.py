"""`make demo` end to end: the real pipeline on digits, and the README shows exactly its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\s+(teacher zero-shot|CE only|SHO|DHO)\b.*%")

pytestmark = pytest.mark.slow


def _rows(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if ROW.match(line)]


def test_demo_runs_and_matches_the_readme(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines/demo/run_demo.py"), "--out", str(tmp_path / "demo")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert len(rows) == 6
    assert rows == _rows((ROOT / "README.md").read_text()), "the README's demo table is out of date: paste the new one"
    top1 = {r.split("  ")[0]: float(re.findall(r"([\d.]+)%", r)[0]) for r in rows}
    assert top1["CE only (labeled data)"] < top1["SHO: CE+KD, single head"]  # the teacher helps
    assert max(v for k, v in top1.items() if k.startswith("DHO")) > top1["SHO: CE+KD, single head"]
    for png in ("runs/dho/alpha_beta_heatmap.png", "runs/dho/grad_cosine.png", "runs/ce+kd/grad_cosine.png"):
        assert (tmp_path / "demo" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
