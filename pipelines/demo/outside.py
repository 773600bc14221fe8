"""Outside baselines for the demo's table: scikit-learn on the raw pixels of each seed's exact split.

    python pipelines/demo/run_demo.py --record-outside   # add them to the recorded run (results.json, README)

The demo's numbers need something outside dho to stand beside. On each seed's own cut of the task (the same
65 labeled images, 809-image pool and 216 test images the students see, recovered from the image keys, which
carry the `load_digits()` row: `digit-0042`) this fits, on the raw pixels of the images the students see (the
task's 32x32 RGB PNGs, 3072 values / 255; for the `plain` scene, whose images are the 8x8 grid upsampled, the 64
intensities of `load_digits()` / 16, as the demo's table was first recorded):
- SVC (RBF, scikit-learn's defaults) and logistic regression on the labeled images only;
- LabelSpreading (kNN, 7 neighbours) on the labeled images plus the unlabeled pool (the pool's labels hidden):
  a classic semi-supervised method on the same data the students get;
- SVC on all train labels: what full supervision on the pool gives (an upper bound, not a competitor).
They need no training of dho's and no teacher; deterministic for a seed. `run_demo.py` computes them with
every seed; `run_demo.py --record-outside` recomputes them for the recorded seeds (their splits remade with
`make_digits.py`, `dho prepare` and `dho split`, which depend on the seed only) into results.json and the README.

Out of scope: tuning these baselines (defaults only), features other than the raw pixels.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

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


def task_pixels(digits_dir: Path, rows: np.ndarray) -> np.ndarray:
    """(len(rows), 3072) raw pixels / 255 of the task images of `rows` (their PNGs under digits_dir/task/*/*/)."""
    from PIL import Image

    files = {int(m.group(1)): f for f in sorted(Path(digits_dir).glob("task/*/*/digit-*.png")) if (m := _ROW.search(f.name))}
    missing = sorted(set(rows.tolist()) - set(files))
    if missing:
        sys.exit(f"demo: {digits_dir}/task has no image of load_digits() row {missing[0]}; remake the demo's data")
    return np.stack([np.asarray(Image.open(files[r]).convert("RGB"), dtype=np.float32).reshape(-1) / 255.0 for r in rows])


def outside_baselines(digits_json: Path, labeled: Path) -> dict:
    """Test top-1 (%) of the four baselines on the split of `digits_json` (make_digits.py's record) with the labeled
    subset of the dataset `labeled` (made by `dho split` of the task's train part)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.semi_supervised import LabelSpreading
    from sklearn.svm import SVC

    from dho import data

    digits = load_digits()
    y = digits.target  # (1797,)
    record = json.loads(Path(digits_json).read_text())
    parts = record["parts"]
    train, test = np.array(parts["task/train"]["rows"]), np.array(parts["task/test"]["rows"])
    if record.get("scene", "plain") == "plain":
        x = digits.data / 16.0  # (1797, 64) in [0, 1]
    else:  # rows outside the task stay zero: never read
        task = np.concatenate([train, test])
        x = np.zeros((len(y), 3 * 32 * 32), dtype=np.float32)
        x[task] = task_pixels(Path(digits_json).parent, task)
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
        "num_labeled": int(len(lab)), "num_pool": int(len(train)), "num_test": int(len(test)), "features": int(x.shape[1]),
    }
