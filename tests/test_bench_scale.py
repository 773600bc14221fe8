"""bench/bench_scale.py (issue 13) at two tiny N: every column of the report, sane values, the power-law fit.

Timings are never asserted; only that they were measured and are consistent with each other.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "bench_scale.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_fits_recover_their_parameters_and_project():
    ns = [1e3, 1e4, 1e5]
    a, b = bench.fit_power_law(ns, [3.0 * n**0.5 for n in ns])
    assert (a, b) == (pytest.approx(3.0), pytest.approx(0.5))
    a, c = bench.fit_affine(ns, [40.0 + 1e-3 * n for n in ns])
    assert (a, c) == (pytest.approx(40.0), pytest.approx(1e-3))
    n14 = bench.PROJECT_TO["14M (ImageNet-21k)"]
    rows = [{"n": n, **{k: 40.0 + 1e-3 * n for k, _ in bench.COLUMNS[2:]}} for n in (10_000, 100_000)]  # fixed + per sample
    fits = bench.project(rows)["worker_uss_mb"]
    assert fits["affine"]["14M (ImageNet-21k)"] == pytest.approx(40.0 + 1e-3 * n14)
    assert fits["power"]["exponent"] < 0.5  # the fixed cost hides the per-sample cost from the power law ...
    assert fits["power"]["14M (ImageNet-21k)"] < 0.2 * (40.0 + 1e-3 * n14)  # ... which projects far too little
    assert bench.fit_affine([1e4, 1e5], [3.0, 2.0]) == (2.5, 0.0)  # shrinking (noise) is no negative cost per sample
    assert bench.fit_power_law([1e3], [1.0]) is None and bench.fit_affine([1e3], [1.0]) is None  # one size: nothing to fit
    assert bench.fit_power_law([1e3, 1e4], [0.0, 1.0]) is None  # log of 0


def test_quick_run_reports_every_column_with_sane_values(tmp_path):
    work, md, js = tmp_path / "work", tmp_path / "scale.md", tmp_path / "scale.json"
    work.mkdir()
    assert bench.main(["--quick", "--workdir", str(work), "--out", str(md), "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    rows = result["rows"]
    assert [r["n"] for r in rows] == [600, 1200]
    for r in rows:
        assert all(k in r for k, _ in bench.COLUMNS)
        assert r["shards"] == r["n"] // 100
        assert r["cache_files"] == r["cache_files_layout"]  # the layout rule that projects the file count is exact
        assert 0 < r["cache_mb"] < 1
        for k in ("write_s", "index_s", "split_s", "cache_write_s", "open_s", "streams_s", "seek_s", "setup_s", "first_step_s"):
            assert 0 < r[k] < 300 and math.isfinite(r[k]), k
        assert r["open_s"] == pytest.approx(sum(r["open_parts_s"].values()))
        assert r["setup_s"] <= r["first_step_s"]
        assert 0 < r["index_base_mb"] <= r["index_peak_mb"] < 1000 and r["index_workers_peak_mb"] > 0
        assert r["streams_s"] == pytest.approx(sum(r["streams_parts_s"].values()))
        assert r["workers_seen"] == 1
        assert 0 < r["main_uss_mb"] <= r["main_pss_mb"] <= r["main_rss_mb"]
        assert 0 < r["worker_uss_mb"] <= r["worker_pss_mb"] <= r["worker_rss_mb"]
    assert bench.layout_files(14_197_122, 1000, 16, 10) < 50_000  # the README's 16-view top-10 ImageNet-21k cache
    assert result["fits"]["cache_files"]["layout"]["100M"] == bench.layout_files(100_000_000, 100, 2, 10)
    for k, _ in bench.COLUMNS[2:]:
        power, affine = result["fits"][k]["power"], result["fits"][k]["affine"]
        assert math.isfinite(power["exponent"]) and all(power[label] > 0 for label in bench.PROJECT_TO), k
        assert all(math.isfinite(affine[label]) for label in bench.PROJECT_TO), k
    assert set(result["targets"]) <= {k for k, _ in bench.COLUMNS}

    text = md.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(h for _, h in bench.COLUMNS) + " |"
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| 600", "| 1,200", "| exponent b of a N^b", "| **14M (ImageNet-21k)**, a N^b", "| **100M**, a N^b",
        "| **14M (ImageNet-21k)**, a + c N", "| **100M**, a + c N", "| **14M (ImageNet-21k)**, cache layout",
        "| **100M**, cache layout", "| target (at most)"]
    assert all(line.count("|") == len(bench.COLUMNS) + 1 for line in table)
    assert all(f"({k})" in text for k in bench.TARGETS)
    assert all(f"({k}): b = " in text for k in bench.EXPONENT_TARGETS)  # issue 28's growth bounds, each with a verdict
    assert list(work.iterdir()) == []  # generated data removed (no --keep)


def test_quick_cache_info_section_reports_its_times_and_exponent(tmp_path):
    """`--cache-info` (issue 28): `dho cache-info`'s time against N, its exponent, the same agreement as densifying."""
    work, md, js = tmp_path / "work", tmp_path / "ci.md", tmp_path / "ci.json"
    work.mkdir()
    assert bench.main(["--quick", "--cache-info", "--before", "--workdir", str(work), "--out", str(md), "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert [r["n"] for r in result["rows"]] == [600, 1200]
    for r in result["rows"]:
        assert r["cache_files"] == 20 and r["agreement_count"] == r["n"]  # 6 / 12 shards in one Zarr shard per view; every sample labeled
        assert all(0 < r[k] < 300 for k in ("cache_write_s", "summarize_s", "cli_s", "densified_s"))
    assert math.isfinite(result["fits"]["summarize_s"]["exponent"]) and result["target_exponent"] == 1.05
    text = md.read_text()
    assert "| exponent b of a N^b |" in text and "target exponent <= 1.05" in text
    assert list(work.iterdir()) == []
