"""Outside baselines for the demo's table: scikit-learn on the raw 8x8 pixels of each seed's exact split.

    python pipelines/demo/outside.py --record     # add them to the recorded run (pipelines/demo/results.json, README)

The demo's numbers need something outside dho to stand beside. On each seed's own cut of the task (the same
65 labeled images, 809-image pool and 216 test images the students see, recovered from the image keys, which
carry the `load_digits()` row: `digit-0042`) this fits, on the 64 raw intensities / 16:
- SVC (RBF, scikit-learn's defaults) and logistic regression on the labeled images only;
- LabelSpreading (kNN, 7 neighbours) on the labeled images plus the unlabeled pool (the pool's labels hidden):
  a classic semi-supervised method on the same data the students get;
- SVC on all train labels: what full supervision on the pool gives (an upper bound, not a competitor).
They need no training of dho's and no teacher; deterministic for a seed. `run_demo.py` computes them with
every seed; `--record` recomputes them for the recorded seeds (their splits are remade with `make_digits.py`,
`dho prepare` and `dho split`, which depend on the seed only) and rewrites results.json and the README table.

Out of scope: tuning these baselines (defaults only), features other than the raw pixels.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROWS = (  # (key, table label)
    ("svc_labeled", "SVC, labeled images only"),
    ("logreg_labeled", "logistic regression, labeled only"),
    ("label_spreading", "LabelSpreading kNN-7, labeled + pool"),
    ("svc_all_labels", "SVC on all train labels (bound)"),
)
_ROW = re.compile(r"digit-(\d+)")


def _rows(keys) -> np.ndarray:
    rows = [int(m.group(1)) for m in map(_ROW.search, keys) if m]
    if len(rows) != len(keys):
        sys.exit("demo: a dataset key does not carry its load_digits() row (digit-NNNN); remake the demo's data")
    return np.array(rows, dtype=np.int64)


def outside_baselines(digits_json: Path, labeled: Path) -> dict:
    """Test top-1 (%) of the four baselines on the split of `digits_json` (make_digits.py's record) with the labeled
    subset of the dataset `labeled` (made by `dho split` of the task's train part)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.semi_supervised import LabelSpreading
    from sklearn.svm import SVC

    from dho import data

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target  # (1797, 64) in [0, 1], (1797,)
    parts = json.loads(Path(digits_json).read_text())["parts"]
    train, test = np.array(parts["task/train"]["rows"]), np.array(parts["task/test"]["rows"])
    lab = _rows(data.Dataset.open(labeled).keys)
    if not set(lab) <= set(train):
        sys.exit(f"demo: {labeled} holds images outside the task's train part of {digits_json}")

    def score(model, fit_x, fit_y) -> float:
        model.fit(fit_x, fit_y)
        return round(100.0 * float((model.predict(x[test]) == y[test]).mean()), 2)

    hidden = np.where(np.isin(train, lab), y[train], -1)  # the pool's labels hidden
    return {
        "svc_labeled": score(SVC(), x[lab], y[lab]),
        "logreg_labeled": score(LogisticRegression(max_iter=5000), x[lab], y[lab]),
        "label_spreading": score(LabelSpreading(kernel="knn", n_neighbors=7, max_iter=1000), x[train], hidden),
        "svc_all_labels": score(SVC(), x[train], y[train]),
        "num_labeled": int(len(lab)), "num_pool": int(len(train)), "num_test": int(len(test)),
    }


def recompute(seed: int, work: Path) -> dict:
    """The seed's split remade (make_digits.py, dho prepare, dho split as run_demo.py runs them), its baselines."""
    sys.path.insert(0, str(HERE))
    import run_demo

    py, dho = sys.executable, run_demo.DHO
    out = work / f"seed-{seed}"
    subprocess.run([py, HERE / "make_digits.py", "--out", out / "digits", "--seed", str(seed)], check=True, capture_output=True)
    subprocess.run([dho, "prepare", out / "digits" / "task" / "train", "--out", out / "train", "--shard-size", "64",
                    "--seed", str(seed)], check=True, capture_output=True)
    subprocess.run([dho, "split", out / "train", "--out", out / "labeled", "--percent", str(run_demo.LABELED_PERCENT),
                    "--seed", str(seed), "--shard-size", "16"], check=True, capture_output=True)
    return outside_baselines(out / "digits" / "digits.json", out / "labeled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="add the baselines to pipelines/demo/results.json and the README")
    args = parser.parse_args()
    if not args.record:
        parser.error("nothing to do: pass --record (run_demo.py computes the baselines with every seed)")
    sys.path.insert(0, str(HERE))
    import run_demo

    path = HERE / "results.json"
    record = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as work:
        for r in record["per_seed"]:
            r["outside"] = recompute(r["seed"], Path(work))
            print(f"seed {r['seed']}: " + ", ".join(f"{k} {r['outside'][k]:.1f}" for k, _ in ROWS))
    run_demo.write_record(record)


if __name__ == "__main__":
    main()
