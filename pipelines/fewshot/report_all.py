"""The last stage of `make reproduce-fewshot-all`: the few-shot benchmark over every dataset, averaged and drawn.

    python pipelines/fewshot/report_all.py --work runs/fewshot-all --datasets "caltech101 ... imagenet" \
        --recipe pipelines/fewshot/coop-resnet18.yaml --imagenet-recipe pipelines/fewshot/resnet50-dino.yaml \
        --out runs/fewshot-all/table.md --figures runs/fewshot-all/figures [--smoke]

Reads WORK/DATASET/results.json (written by `report.py --json-out`: per row and K the top-1 of every seed) and
the runs' WORK/DATASET/runs/*/metrics.jsonl (the `--log-grad-cosine` records), and writes:

  table.md                    the 10-dataset average (the ten of the CoOp benchmark, Table 14 "DHO (base)") and
                              the 11-dataset average (with ImageNet) beside the paper's, then every dataset per K
  figures/accuracy_vs_shots.png   Figs. 5 / 11: per dataset and averaged, DHO vs CE+KD (SHO) vs the zero-shot teacher
  figures/teachers.png            Figs. 6 / 12: zero-shot vs few-shot teacher: DHO, DHO-F, both teachers
  figures/largest_k.png           Fig. 2 (left) and Fig. 8: every method at the largest K per dataset, the average,
                                  and DHO's gain over the second best
  figures/grad_conflict.png       Figs. 4 / 13 averaged over the datasets (only if the runs logged them:
                                  LOG_GRAD_COSINE=N)

A dataset's number is the mean over its seeds; an average is the mean of the datasets' numbers (the paper's way:
each dataset counts once). An average over fewer datasets than its name says is labelled with the ones it has,
and has no Δ against the paper's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tables import fmt, read_json, write_table  # noqa: E402

TEN = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
       "eurosat", "ucf101")  # the ten datasets of Figs. 5/6/8/11/12 and Table 14's average, CoOp's order
SHORT = {"caltech101": "Caltech101", "oxford_pets": "Pets", "stanford_cars": "Cars", "oxford_flowers": "Flowers",
         "food101": "Food101", "fgvc_aircraft": "Aircraft", "sun397": "SUN397", "dtd": "DTD", "eurosat": "EuroSAT",
         "ucf101": "UCF101", "imagenet": "ImageNet"}
SINGLE_HEAD_ROWS = ("KD", "CE", "CE+KD (logit)", "CE+KD (feature)", "CE+KD (logit) + PCGrad",  # report.py's BASELINE_ROWS
                    "SSKD", "DHKD")  # dual-head KD baselines that predict with one head (h_CE): DHO's competitors all the same
MAIN_ROWS = ("DHO", "DHO-F", "DHO (h_CE)", "DHO (h_KD)", *SINGLE_HEAD_ROWS, "Tip-Adapter-F teacher", "zero-shot teacher")
STUDENT_ROWS = ("DHO", "DHO (h_CE)", "DHO (h_KD)", *SINGLE_HEAD_ROWS)  # Fig. 2 / 8 bars
GRAD_KEYS = (("grad_cosine", "cos(∇θ L_CE, ∇θ L_KD)", "parameters of g (Fig. 4)"),
             ("pred_inner", "(p̂_CE − y)ᵀ(p̂_KD − p)", "prediction level (Fig. 4)"),
             ("grad_cosine_z", "cos(∇z L_CE, ∇z L_KD)", "features z (Fig. 13 right)"),
             ("eig", "dominant eigenvalue", "W Wᵀ (Fig. 13 left)"))
PROGRESS = [i / 10 for i in range(11)]  # training progress at which the diagnostics are averaged (runs differ in steps)


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def load(work: Path, datasets: list[str]) -> dict[str, dict]:
    """DATASET -> its results.json with `mean`: row -> {K: mean over seeds} (zero-shot teacher under every K)."""
    out = {}
    for d in datasets:
        r = read_json(work / d / "results.json", "reproduce-fewshot-all")
        mean = {row: {int(k): _mean(v) for k, v in by_k.items() if v} for row, by_k in r["rows"].items()}
        mean["zero-shot teacher"] = {int(k): r["zero_shot_teacher"] for k in r["shots"]}
        out[d] = {**r, "mean": mean}
    return out


def average(results: dict[str, dict], datasets: list[str], row: str, k: int):
    """The mean over `datasets` of the row's per-dataset number at K, and the datasets it had one for."""
    have = [d for d in datasets if results[d]["mean"].get(row, {}).get(k) is not None]
    return (_mean(results[d]["mean"][row][k] for d in have) if have else None), have


def _by_k(values: dict | None) -> dict[int, float]:
    return {int(k.removesuffix("shot")): v for k, v in (values or {}).items() if v is not None}


def paper_averages(recipe: dict, imagenet_recipe: dict | None) -> dict[str, dict[str, dict[int, float]]]:
    """{"ten"|"eleven": {row: {K: the paper's average}}}: the ten-dataset average of DHO (the ten datasets' recipe
    `expected.top1`, Table 14) and of each Table 14 variant (`expected.variants`, rows "DHO (NAME)"), and the
    11-dataset ones derived with ImageNet's (its recipe's): (10 x average + ImageNet) / 11 (the paper prints no
    11-dataset mean)."""
    def rows(r: dict | None) -> dict[str, dict[int, float]]:
        expected = (r or {}).get("expected") or {}
        out = {"DHO": _by_k(expected.get("top1"))}
        out.update({variant_row(v): _by_k(values) for v, values in (expected.get("variants") or {}).items() if v != "base"})
        return out

    ten, imnet = rows(recipe), rows(imagenet_recipe)
    eleven = {row: {k: (10 * v + imnet[row][k]) / 11 for k, v in by_k.items() if k in imnet.get(row, {})} for row, by_k in ten.items()}
    return {"ten": {r: v for r, v in ten.items() if v}, "eleven": {r: v for r, v in eleven.items() if v}}


def variant_row(name: str) -> str:
    """report.py's row of a Table 14 variant."""
    return f"DHO ({name})"


def _delta(ours, paper, complete: bool) -> str:
    return "–" if ours is None or paper is None or not complete else f"{round(ours - paper, 1) + 0.0:+.1f}"


def _rows_present(results: dict[str, dict]) -> list[str]:
    """MAIN_ROWS that ran, with Table 14's variant rows ("DHO (NAME)", not in MAIN_ROWS) after DHO."""
    rows = [row for row in MAIN_ROWS if any(r["mean"].get(row) for r in results.values())]
    variants = sorted({row for r in results.values() for row in r["mean"] if row not in MAIN_ROWS and row.startswith("DHO (")})
    at = rows.index("DHO") + 1 if "DHO" in rows else 0
    return rows[:at] + variants + rows[at:]


def build_table(results: dict[str, dict], shots: list[int], paper: dict, smoke: bool, diag: dict | None) -> str:
    datasets = list(results)
    ten = [d for d in datasets if d in TEN]
    eleven = ten + [d for d in datasets if d == "imagenet"]
    lines = []
    if smoke:
        lines += ["# SMOKE RUN of `make reproduce-fewshot-all` on generated datasets", "",
                  "**Smoke numbers**: random-init tiny CLIP teachers and tiny students on a few colour classes per dataset,",
                  "a few epochs on CPU. They check the graph, the averages and the figures; they say nothing about DHO.",
                  "The paper columns stay empty: the paper's averages are not numbers of this data."]
        paper = {"ten": {}, "eleven": {}}
    else:
        lines += ["# Few-shot semi-supervised benchmark over the datasets: reproduction"]
    lines += ["", f"Datasets: {', '.join(datasets)}. A dataset's number: mean over its seeds; an average: mean over the datasets.",
              f"10-dataset average: over {len(ten)} of the ten ({', '.join(SHORT[d] for d in ten) or 'none'}); "
              f"11-dataset average: over {len(eleven)} of the eleven. A Δ only where every dataset of the average ran.",
              "Paper: the ten-dataset averages of Table 14 (\"DHO (base)\" and its non-linear-head variants); the",
              "11-dataset ones are derived as (10 × that + ImageNet's) / 11, ImageNet's from its recipe (the paper prints",
              "no 11-dataset mean)."]
    rows = _rows_present(results)
    cols = "".join(f" {k}-shot 10-avg | paper | Δ | {k}-shot 11-avg | paper | Δ |" for k in shots)
    lines += ["", "## Averages", "", f"| method |{cols}", "|---|" + "---|---|---|---|---|---|" * len(shots)]
    for row in rows:
        cells = ""
        for k in shots:
            for group, name, full in ((ten, "ten", len(ten) == 10), (eleven, "eleven", len(eleven) == 11)):
                ours, _ = average(results, group, row, k)
                theirs = paper[name].get(row, {}).get(k)
                cells += f" {fmt(ours)} | {fmt(theirs)} | {_delta(ours, theirs, full)} |"
        lines.append(f"| {row} |{cells}")
    gain = _gain_lines(results, shots, ten, eleven)
    lines += ["", *gain]
    for k in shots:
        present = [row for row in rows if any(results[d]["mean"].get(row, {}).get(k) is not None for d in datasets)]
        lines += ["", f"## {k}-shot, per dataset (top-1 %, mean over seeds)", "",
                  "| dataset | seeds | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
        for d in datasets:
            r = results[d]
            lines.append(f"| {SHORT.get(d, d)} | {len(r['seeds'])} | "
                         + " | ".join(fmt(r["mean"].get(row, {}).get(k)) for row in present) + " |")
    if diag:
        lines += ["", "## Gradient conflict (Figs. 4, 13), averaged over the datasets", "",
                  f"Runs: {diag['note']}. Mean over training of each diagnostic, then over runs and datasets.", "",
                  "| method | " + " | ".join(k for k, *_ in GRAD_KEYS[:3]) + " | eig_ce | eig_ce_kd |", "|---|---|---|---|---|---|"]
        for method, summary in diag["summary"].items():
            lines.append(f"| {method} | " + " | ".join(_fmt4(summary.get(k)) for k in ("grad_cosine", "pred_inner", "grad_cosine_z",
                                                                                       "eig_ce", "eig_ce_kd")) + " |")
    lines += ["", "Per-dataset tables (every seed, the paper's columns, the run list): "
              + ", ".join(f"`{d}/table.md`" for d in datasets) + ".",
              "Figures: `figures/accuracy_vs_shots.png` (Figs. 5/11), `figures/teachers.png` (Figs. 6/12), "
              "`figures/largest_k.png` (Figs. 2 left, 8)" + (", `figures/grad_conflict.png` (Figs. 4/13)." if diag else ".")]
    return "\n".join(lines) + "\n"


def _gain_lines(results, shots, ten, eleven) -> list[str]:
    """DHO against the best single-head baseline that ran, averaged (Fig. 2 left's 'improvement over the second best')."""
    k = max(shots)
    out = []
    for group, name in ((ten, "10"), (eleven, "11")):
        gains = []
        for d in group:
            m = results[d]["mean"]
            dho = m.get("DHO", {}).get(k)
            others = [m[row][k] for row in SINGLE_HEAD_ROWS if m.get(row, {}).get(k) is not None]
            if dho is not None and others:
                gains.append(dho - max(others))
        if gains:
            out.append(f"DHO − best single-head baseline at {k} shots, {name}-dataset mean over the {len(gains)} datasets "
                       f"with a baseline: {statistics.fmean(gains):+.1f} (min {min(gains):+.1f}, max {max(gains):+.1f}).")
    return out


def _fmt4(x) -> str:
    return "–" if x is None else f"{x:.4g}"


# ---- the diagnostics of Figs. 4 / 13 ----------------------------------------------------------------------------
def _run_diagnostics(run: Path) -> list[dict] | None:
    """The run's --log-grad-cosine records with `progress` = step / the run's last step; None without any."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    last = max((r["step"] for r in records if "step" in r), default=0)
    diag = [dict(r, progress=r["step"] / last) for r in records if "grad_cosine" in r and last]
    return diag or None


def _interpolate(records: list[dict], key: str) -> list[float | None]:
    pts = sorted((r["progress"], r[key]) for r in records if r.get(key) is not None)
    if not pts:
        return [None] * len(PROGRESS)
    out = []
    for x in PROGRESS:
        if x <= pts[0][0]:
            out.append(pts[0][1])
        elif x >= pts[-1][0]:
            out.append(pts[-1][1])
        else:
            (x0, y0), (x1, y1) = next((a, b) for a, b in zip(pts, pts[1:]) if a[0] <= x <= b[0])
            out.append(y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1)
    return out


def diagnostics(work: Path, results: dict[str, dict]) -> dict | None:
    """Per method (DHO, CE+KD), the diagnostics averaged over the datasets at the training-progress grid, and
    their means over training; from the (K, seed) pairs where both methods logged them."""
    series = {"DHO": {}, "CE+KD (logit)": {}}  # method -> dataset -> [records of each run]
    pairs_used = 0
    for d, r in results.items():
        sho_runs = {f"k{k}-s{s}": name for k, by_s in (r.get("baselines") or {}).get("ce+kd", {}).items() for s, name in by_s.items()}
        for pair, sho_name in sorted(sho_runs.items()):
            dho = _run_diagnostics(work / d / "runs" / f"zs-{pair}")
            sho = _run_diagnostics(work / d / "runs" / sho_name)
            if dho and sho:
                series["DHO"].setdefault(d, []).append(dho)
                series["CE+KD (logit)"].setdefault(d, []).append(sho)
                pairs_used += 1
    if not pairs_used:
        return None
    keys = ("grad_cosine", "pred_inner", "grad_cosine_z", "eig_ce", "eig_kd", "eig_ce_kd")
    curves, summary = {}, {}
    for method, by_d in series.items():
        per_d = {key: [] for key in keys}  # key -> per dataset: its curve (mean over runs)
        means = {key: [] for key in keys}
        for runs in by_d.values():
            for key in keys:
                run_curves = [c for c in (_interpolate(run, key) for run in runs) if c[0] is not None]
                if run_curves:
                    per_d[key].append([statistics.fmean(v) for v in zip(*run_curves)])
                    means[key].append(statistics.fmean(statistics.fmean(r[key] for r in run if key in r) for run in runs
                                                       if any(key in r for r in run)))
        curves[method] = {key: [statistics.fmean(v) for v in zip(*c)] for key, c in per_d.items() if c}
        summary[method] = {key: statistics.fmean(v) for key, v in means.items() if v}
    n = len(series["DHO"])
    return {"curves": curves, "summary": summary,
            "note": f"{pairs_used} (K, seed) pairs over {n} dataset{'s' if n > 1 else ''} where both DHO (zero-shot teacher) "
                    f"and CE+KD logged them (LOG_GRAD_COSINE)"}


# ---- figures -------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)
    return path


def _panels(results: dict[str, dict]) -> list[tuple[str, list[str]]]:
    """(title, datasets) per panel: each dataset, then the averages that have more than one dataset."""
    datasets = list(results)
    ten = [d for d in datasets if d in TEN]
    panels = [(SHORT.get(d, d), [d]) for d in datasets]
    if len(ten) > 1:
        panels.append((f"Average of {len(ten)}" + (" (the ten)" if len(ten) == 10 else " of the ten"), ten))
    if "imagenet" in datasets and ten:
        panels.append((f"Average of {len(ten) + 1}" + (" (all eleven)" if len(ten) == 10 else " with ImageNet"), ten + ["imagenet"]))
    return panels


def _grid(n: int):
    plt = _plt()
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _curve(ax, results, group, row, shots, **style):
    ys = [average(results, group, row, k)[0] for k in shots]
    pts = [(k, y) for k, y in zip(shots, ys) if y is not None]
    if pts:
        ax.plot(*zip(*pts), marker="o", ms=4, label=row, **style)


def _shots_axis(ax, shots):
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots)
    ax.set_xticklabels([str(k) for k in shots])
    ax.minorticks_off()
    ax.set_xlabel("labels per class (K)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)


def figure_accuracy(results, shots, paper) -> "object":
    """Figs. 5 / 11: DHO vs CE+KD (logit) vs the zero-shot teacher, per dataset and averaged."""
    panels = _panels(results)
    fig, axes = _grid(len(panels))
    for ax, (title, group) in zip(axes, panels):
        _curve(ax, results, group, "DHO", shots, color="C3")
        _curve(ax, results, group, "CE+KD (logit)", shots, color="C0")
        _curve(ax, results, group, "zero-shot teacher", shots, color="gray", ls="--")
        theirs = paper["ten"].get("DHO", {}) if group == [d for d in results if d in TEN] and len(group) == 10 else {}
        if theirs:
            ax.plot(list(theirs), list(theirs.values()), "kx", label="paper: DHO (Table 14)")
        ax.set_title(title, fontsize=10)
        _shots_axis(ax, shots)
    axes[0].legend(fontsize=7)
    fig.suptitle("Few-shot semi-supervised: DHO vs single-head CE+KD vs the zero-shot teacher (Figs. 5 / 11)", fontsize=11)
    fig.tight_layout()
    return fig


def figure_teachers(results, shots) -> "object":
    """Figs. 6 / 12: the student of the zero-shot teacher (DHO) and of the few-shot one (DHO-F), with both teachers."""
    panels = _panels(results)
    fig, axes = _grid(len(panels))
    for ax, (title, group) in zip(axes, panels):
        _curve(ax, results, group, "DHO", shots, color="C3")
        _curve(ax, results, group, "DHO-F", shots, color="C2")
        _curve(ax, results, group, "zero-shot teacher", shots, color="gray", ls="--")
        _curve(ax, results, group, "Tip-Adapter-F teacher", shots, color="C2", ls=":")
        ax.set_title(title, fontsize=10)
        _shots_axis(ax, shots)
    axes[0].legend(fontsize=7)
    fig.suptitle("Zero-shot vs few-shot teacher: DHO and DHO-F (Figs. 6 / 12)", fontsize=11)
    fig.tight_layout()
    return fig


def figure_largest_k(results, shots) -> "object":
    """Figs. 2 (left) and 8: every student method at the largest K per dataset and averaged, DHO's gain over the
    second best above its bar."""
    plt = _plt()
    k = max(shots)
    panels = _panels(results)
    rows = [row for row in STUDENT_ROWS if any(results[d]["mean"].get(row, {}).get(k) is not None for d in results)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(panels) * (len(rows) + 1) * 0.32 + 2), 3.8))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs, ys = [], []
        for j, (_, group) in enumerate(panels):
            y = average(results, group, row, k)[0]
            if y is not None:
                xs.append(j + (i - (len(rows) - 1) / 2) * width)
                ys.append(y)
        ax.bar(xs, ys, width, label=row, color="C3" if row == "DHO" else f"C{(i % 9) + (i > 2)}")
    for j, (_, group) in enumerate(panels):
        values = {row: average(results, group, row, k)[0] for row in rows}
        dho = values.get("DHO")
        others = [v for row, v in values.items() if row in SINGLE_HEAD_ROWS and v is not None]
        if dho is not None and others:
            ax.annotate(f"{dho - max(others):+.1f}", (j - (len(rows) - 1) / 2 * width, dho), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(panels)))
    ax.set_xticklabels([t for t, _ in panels], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{k}-shot: DHO (above it: its gain over the best single-head baseline) vs its one-head ablations "
                 "and the baselines (Figs. 2 left, 8)", fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(rows)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def figure_grad(diag: dict) -> "object":
    """Figs. 4 / 13 averaged over the datasets: each diagnostic against training progress, DHO vs CE+KD."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, ylabel, title) in zip(axes, GRAD_KEYS):
        for method, curves in diag["curves"].items():
            color = "C3" if method == "DHO" else "C0"
            if key == "eig":
                for k, style, label in (("eig_ce", "-", "W_CE W_CEᵀ"), ("eig_kd", "--", "W_KD W_KDᵀ"), ("eig_ce_kd", ":", "W_CE W_KDᵀ")):
                    if k in curves and (method == "DHO" or k == "eig_ce"):
                        ax.plot(PROGRESS, curves[k], style, color=color, marker=".",
                                label=f"{method}: {label if method == 'DHO' else 'W Wᵀ'}")
                ax.set_yscale("symlog", linthresh=1e-3)
                continue
            if key in curves:
                ax.plot(PROGRESS, curves[key], color=color, marker=".", label=method)
        if key != "eig":
            ax.axhline(0.0, color="gray", lw=0.8)
        if key.startswith("grad_cosine"):
            ax.set_ylim(-1, 1)
        ax.set_xlabel("training progress (step / last step)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(f"Gradient conflict between L_CE and L_KD, averaged over the datasets ({diag['note'].split(' where')[0]})", fontsize=10)
    fig.tight_layout()
    return fig


def write_figures(results, shots, paper, diag, out: Path, smoke: bool) -> list[Path]:
    paper = {"ten": {}, "eleven": {}} if smoke else paper
    paths = [_save(figure_accuracy(results, shots, paper), out / "accuracy_vs_shots.png"),
             _save(figure_teachers(results, shots), out / "teachers.png"),
             _save(figure_largest_k(results, shots), out / "largest_k.png")]
    if diag:
        paths.append(_save(figure_grad(diag), out / "grad_conflict.png"))
    return paths


def _recipe(path: Path | None) -> dict | None:
    if path is None:
        return None
    if not path.is_file():
        sys.exit(f"error: recipe {path} not found; pass FS_RECIPE= / IMAGENET_RECIPE=pipelines/fewshot/<recipe>.yaml")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="Folder with one reproduce-fewshot work folder per dataset.")
    parser.add_argument("--datasets", required=True, help="Space-separated dataset names (CoOp's), e.g. 'dtd eurosat imagenet'.")
    parser.add_argument("--recipe", type=Path, required=True, help="The ten datasets' recipe (its expected top1: the paper's average).")
    parser.add_argument("--imagenet-recipe", type=Path, default=None, help="ImageNet's recipe (its expected top1, for the 11-average).")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write.")
    parser.add_argument("--figures", type=Path, required=True, help="Folder for the PNG figures.")
    parser.add_argument("--smoke", action="store_true", help="Title the table as a smoke run (no paper numbers).")
    args = parser.parse_args()
    datasets = args.datasets.split()
    if not datasets:
        sys.exit("error: --datasets is empty: give at least one dataset, e.g. --datasets 'dtd eurosat'")
    results = load(args.work, datasets)
    shots = sorted({int(k) for r in results.values() for k in r["shots"]})
    paper = paper_averages(_recipe(args.recipe), _recipe(args.imagenet_recipe))
    diag = diagnostics(args.work, results)
    table = build_table(results, shots, paper, args.smoke, diag)
    write_figures(results, shots, paper, diag, args.figures, args.smoke)
    write_table(args.out, table)


if __name__ == "__main__":
    main()
