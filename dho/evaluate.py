"""Inference with both heads (Eq. 11, Alg. 2), metrics, the alpha/beta search and its heatmap.

    p_hat = alpha * softmax(ce_head(z)) + (1 - alpha) * softmax(kd_head(z) / beta)    (Eq. 11)

alpha and beta are inference-time knobs. ``evaluate`` takes them from, in order: explicit
arguments, the run's ``alpha_beta.json`` (written by an earlier ``--search-on``), the values
stored in ``model.pt`` by distill (the run's config: paper defaults 0.5 / 0.5).

The search (``search_on``) runs on a labeled validation dataset and refuses to run on the
data being evaluated (same manifest fingerprint): never tune on the test split. Likewise a
stored ``alpha_beta.json`` searched on the very dataset being evaluated is refused.

Which data a run can be scored on (``open_labeled``, the one rule for evaluate, analyze and
``distill --val``): the run's class list, or a subset of it by name (ImageNet-R's 200 of 1000:
each head's logits are restricted to those classes, ``restrict``), with at least one labeled
sample (samples labeled -1 are left out, ``labeled_only``).

Evaluation view (``views="center"``, the default): open_clip's eval transform for the student's
preprocessing, pixel for pixel (``data.eval_view_uint8``): resize the short side to the student's
size, then center-crop (``resize_mode`` "shortest"); "squash" and "longest" for students whose
preprocessing says so, e.g. DFN-pretrained towers; then the student's normalisation.
``views="random"`` scores the way the reference's ``train_imgnet_semi.py`` scored Table 4: one
training view per image (RandomResizedCrop scale 0.5-1, ratio 3/4-4/3, flip 0.5), drawn per
(seed, key, draw) by the training crop sampler (``Preprocessing.random_view``) and replayed straight
at the student's size (the reference resized the crop to the teacher's 378 px first, then to 224:
docs/fidelity.md); ``draws`` full passes with draws 0 ... N-1, their metrics averaged.

Token merging (``tome_r``, paper Table 9): evaluate and predict can run a ViT student with ToMe, r tokens merged
per block (``dho.tome``); evaluate's result records the settings under "tome".

Out of scope: multi-crop / TTA evaluation (the draws are scored one by one, never averaged per
image), per-class metrics, distributed evaluation.
"""

from __future__ import annotations

import glob
import math
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from dho import data as data_lib
from dho.atomic import write_atomic
from dho.devices import resolve_device
from dho.errors import ConfigError, DatasetError, check_choice, check_number
from dho.progress import Progress
from dho.run_dir import ALPHA_BETA, ALPHA_BETA_PREVIOUS, HEATMAP, MODEL, RunDir, write_json
from dho.students import DualHeadStudent

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1 (paper §4.1)
BETA_GRID = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # kd_head temperatures, 0.1 ... 4
# the beta grids a search can use (`--beta-grid`): dho's wide one, or the ten-dataset reference's (train_others.py)
BETA_GRIDS = {"wide": BETA_GRID, "reference": (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)}
DEFAULT_ALPHA, DEFAULT_BETA = 0.5, 0.5  # low-shot defaults (Table 6); also the search's tie-break centre
VIEWS = ("center", "random")  # evaluate's views: open_clip's eval transform | the reference's random crops
HEADS = ("ce_head", "kd_head", "combined")
# the run-folder names (dho/run_dir.py), under the names this module has always exported
ALPHA_BETA_FILE, PREVIOUS_FILE, HEATMAP_FILE, MODEL_FILE = ALPHA_BETA, ALPHA_BETA_PREVIOUS, HEATMAP, MODEL


# --------------------------------------------------------------------------------------------
# math: head combination, metrics, search
# --------------------------------------------------------------------------------------------


def combine_heads(ce_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """alpha * softmax(ce_logits) + (1 - alpha) * softmax(kd_logits / beta) (Eq. 11) -> (N, C) probs."""
    if not 0.0 <= alpha <= 1.0 or beta <= 0.0:
        raise ConfigError(f"need 0 <= alpha <= 1 and beta > 0 (Eq. 11), got alpha={alpha}, beta={beta}")
    p_ce = torch.softmax(ce_logits.float(), dim=-1)  # (N, C)
    p_kd = torch.softmax(kd_logits.float() / beta, dim=-1)  # (N, C)
    return alpha * p_ce + (1.0 - alpha) * p_kd


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each k (k capped at C) of probabilities or logits (N, C)."""
    if len(labels) == 0:
        raise ConfigError("top-k accuracy of zero samples is undefined")
    labels = torch.as_tensor(labels).long()
    topk = scores.topk(min(max(ks), scores.shape[-1]), dim=-1).indices  # (N, K)
    hit = topk == labels[:, None]  # (N, K)
    return {k: 100.0 * int(hit[:, : min(k, scores.shape[-1])].any(dim=-1).sum()) / len(labels) for k in ks}


def head_metrics(ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                 beta: float) -> dict[str, dict[str, float]]:
    """{ce_head, kd_head, combined (Eq. 11): {top1, top5}} in % of both heads' logits (N, C) against labels (N,)."""
    def pct(scores: torch.Tensor) -> dict:
        acc = topk_accuracy(scores, labels, ks=(1, 5))
        return {"top1": acc[1], "top5": acc[5]}

    # temperature beta does not change the ranking of one head
    return {"ce_head": pct(ce_logits), "kd_head": pct(kd_logits), "combined": pct(combine_heads(ce_logits, kd_logits, alpha, beta))}


def search_alpha_beta(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha_grid: Sequence[float] = ALPHA_GRID,
    beta_grid: Sequence[float] = BETA_GRID,
) -> tuple[float, float, np.ndarray]:
    """Grid search of Eq. 11's (alpha, beta) for top-1 -> (alpha, beta, grid (len(A), len(B)) in %).

    Ties (common on small validation sets) are broken deterministically: highest top-1, then
    alpha closest to 0.5, then beta closest to 0.5 in log scale, then grid order.
    """
    labels = torch.as_tensor(labels).long()
    p_ce = torch.softmax(ce_logits.float(), dim=-1)  # (N, C)
    correct = np.zeros((len(alpha_grid), len(beta_grid)), dtype=np.int64)
    for j, beta in enumerate(beta_grid):
        p_kd = torch.softmax(kd_logits.float() / beta, dim=-1)  # (N, C)
        for i, alpha in enumerate(alpha_grid):
            pred = (alpha * p_ce + (1.0 - alpha) * p_kd).argmax(dim=-1)  # (N,)
            correct[i, j] = int((pred == labels).sum())
    cells = [(i, j) for i in range(len(alpha_grid)) for j in range(len(beta_grid))]
    i, j = min(cells, key=lambda c: (-correct[c], abs(alpha_grid[c[0]] - DEFAULT_ALPHA),
                                     abs(math.log(beta_grid[c[1]] / DEFAULT_BETA)), c))
    grid = 100.0 * correct / len(labels)
    return float(alpha_grid[i]), float(beta_grid[j]), grid


def plot_alpha_beta(
    grid: np.ndarray,
    path: Union[str, Path],
    alpha_grid: Sequence[float] = ALPHA_GRID,
    beta_grid: Sequence[float] = BETA_GRID,
    best: Optional[tuple[float, float]] = None,
    title: str = "validation top-1 (%) of Eq. 11",
) -> Path:
    """Heatmap of top-1 over (alpha rows, beta columns), as the paper's Fig. 10; best cell boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    grid = np.asarray(grid, dtype=float)
    if best is None:
        i, j = np.unravel_index(np.argmax(grid), grid.shape)
    else:
        i, j = list(alpha_grid).index(best[0]), list(beta_grid).index(best[1])
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(beta_grid), 1.5 + 0.36 * len(alpha_grid)))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(beta_grid)), [f"{b:g}" for b in beta_grid])
    ax.set_yticks(range(len(alpha_grid)), [f"{a:g}" for a in alpha_grid])
    ax.set_xlabel("beta (kd_head temperature)")
    ax.set_ylabel("alpha (weight of ce_head)")
    mid = (grid.max() + grid.min()) / 2
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            ax.text(c, r, f"{grid[r, c]:.1f}", ha="center", va="center", fontsize=6,
                    color="black" if grid[r, c] > mid else "white")
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_title(f"{title}\nbest alpha={alpha_grid[i]:g}, beta={beta_grid[j]:g}: {grid[i, j]:.2f}%", fontsize=9)
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    fig.tight_layout()
    path = write_atomic(Path(path), lambda part: fig.savefig(part, dpi=120, format="png"))
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# running the student over a dataset
# --------------------------------------------------------------------------------------------


class _EvalView:
    """Sample -> (view (3, S, S), label, global row): the evaluation view, or with `draw` the random view
    (seed, key, draw) (`Preprocessing.random_view`). A class so workers can pickle it."""

    def __init__(self, preprocess: data_lib.Preprocessing, draw: Optional[int] = None, seed: int = 0):
        self.preprocess, self.draw, self.seed = preprocess, draw, seed

    def __call__(self, sample) -> tuple[torch.Tensor, int, int]:
        if self.draw is None:
            return self.preprocess.eval_view(sample.image), sample.label, sample.index
        return self.preprocess.random_view(sample.image, sample.key, self.draw, self.seed), sample.label, sample.index


@torch.no_grad()
def collect_logits(
    model: DualHeadStudent,
    dataset: data_lib.Dataset,
    batch_size: int = 256,
    device: Union[str, torch.device] = "cpu",
    workers: int = 2,
    features: bool = False,
    draw: Optional[int] = None,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Run the student over the dataset's evaluation views (or, with `draw`, random view `draw` of `seed` of each
    image) -> (ce_logits (N, C), kd_logits (N, C), labels (N,)) as float32 / int64 CPU tensors in dataset order,
    plus z = g(x) (N, D) float32 last with `features`. Restores the model's train mode."""
    device = resolve_device(device)
    reader = data_lib.OrderedReader(dataset, transform=_EvalView(model.preprocess, draw, seed), rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(reader, batch_size=batch_size, num_workers=workers)
    n = dataset.num_samples
    ce = torch.empty(n, model.num_classes)  # (N, C)
    kd = torch.empty(n, model.num_classes)  # (N, C)
    labels = torch.full((n,), -2, dtype=torch.int64)  # (N,), -2 = not seen yet
    z = torch.empty(n, model.feature_dim) if features else None  # (N, D)
    was_training = model.training
    model.eval()
    what = "" if draw is None else f" (random view {draw}, seed {seed})"
    progress = Progress(f"evaluate {dataset.root.name}{what}", n, unit="images", final=False)
    try:
        for x, y, index in loader:
            out = model(x.to(device, non_blocking=True))
            ce[index] = out["ce_logits"].float().cpu()
            kd[index] = out["kd_logits"].float().cpu()
            labels[index] = y
            if z is not None:
                z[index] = out["z"].float().cpu()
            progress.update(len(index))
    finally:
        model.train(was_training)
    seen = progress.done
    if seen != n or bool((labels == -2).any()):
        raise DatasetError(f"{dataset.root}: read {seen} of the {n} samples of the manifest; check the shards with `dho index`")
    return (ce, kd, labels, z) if features else (ce, kd, labels)


# --------------------------------------------------------------------------------------------
# runs and the data they are scored on
# --------------------------------------------------------------------------------------------


def load_run(run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
             weights: Optional[str] = None, tome_r: Optional[int] = None) -> tuple[DualHeadStudent, dict]:
    """The finished student of RUN_DIR (RUN_DIR/model.pt) in eval mode on `device`, and its meta; `weights` ema | raw
    (a run of `dho distill --ema`: its EMA, the default, or its trained weights; see dho.students.load_student).
    `tome_r`: merge that many tokens per block (ToMe, `dho.tome.apply_tome`; ViT students only), its settings in
    meta["tome"]; None: the student as trained."""
    if tome_r is not None:
        check_number("--tome-r", tome_r, low=0, integer=True)
    student, meta = RunDir(run_dir).load_student(device, weights)
    if tome_r is not None:
        from dho.tome import apply_tome

        meta["tome"] = apply_tome(student, tome_r)
    return student, meta


def run_alpha_beta(run_dir: Union[str, Path], meta: dict) -> tuple[float, float, str]:
    """The run's (alpha, beta, source): RUN_DIR/alpha_beta.json if a search wrote one, else model.pt's."""
    return RunDir(run_dir).alpha_beta_of(meta)


def read_alpha_beta(run_dir: Union[str, Path]) -> Optional[dict]:
    """RUN_DIR/alpha_beta.json, or None."""
    return RunDir(run_dir).read_alpha_beta()


def class_columns(ds: data_lib.Dataset, classnames: Sequence[str], what: str = "the dataset") -> Optional[torch.Tensor]:
    """The model's class index of each class of `ds` -> (C_ds,) int64, or None when `ds` has the model's
    very class list. A dataset whose classes are a subset of the model's (by name, e.g. ImageNet-R's 200
    of ImageNet's 1000) is scored on its classes only: each head's logits restricted to these columns,
    as the benchmarks' reference evaluation restricts a 1000-way classifier."""
    classnames = list(classnames)
    if ds.classnames == classnames:
        return None
    where = {n: i for i, n in enumerate(classnames)}
    missing = [n for n in ds.classnames if n not in where]
    if missing:
        raise ConfigError(
            f"{what} {ds.root} has {len(missing)} class name(s) the model does not know (first: {missing[0]!r}; "
            f"{ds.num_classes} vs {len(classnames)} classes); use data with the training class list or a "
            "subset of it (`dho prepare --classes-of`)"
        )
    return torch.tensor([where[n] for n in ds.classnames], dtype=torch.int64)


def open_labeled(data: Union[str, Path, data_lib.Dataset], classnames: Sequence[str],
                 what: str) -> tuple[data_lib.Dataset, Optional[torch.Tensor]]:
    """The one rule for data a run is scored on (evaluate, analyze, `distill --val`): the dataset (opened, or as
    given) with the run's class list or a subset of it, and some labeled samples -> (dataset, its class columns
    in the model's output or None, `class_columns`). `what` names the option in errors (--data, --val, ...)."""
    ds = data if isinstance(data, data_lib.Dataset) else data_lib.Dataset.open(data)
    columns = class_columns(ds, classnames, what)
    if ds.num_samples == 0 or bool((ds.labels < 0).all()):
        raise DatasetError(f"{what} {ds.root} has no labeled samples (all labels are -1); give a labeled dataset")
    return ds, columns


def restrict(ce: torch.Tensor, kd: torch.Tensor, columns: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both heads' logits (N, C) restricted to the dataset's classes (N, C_ds); unchanged without columns."""
    if columns is None:
        return ce, kd
    return ce[:, columns], kd[:, columns]


def labeled_only(ce: torch.Tensor, kd: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of labeled samples (label >= 0) of both heads' logits and of the labels."""
    keep = labels >= 0
    return ce[keep], kd[keep], labels[keep]


def beta_grid_of(name: str) -> tuple[float, ...]:
    """The beta grid called `name` (BETA_GRIDS), or a one-line ConfigError naming the choices."""
    check_choice("--beta-grid", name, tuple(BETA_GRIDS))
    return BETA_GRIDS[name]


def search_and_store(folder: Path, student: DualHeadStudent, val: data_lib.Dataset, batch_size: int, device, workers: int,
                     extra: Optional[dict] = None, columns: Optional[torch.Tensor] = None,
                     announce: bool = True, beta_grid: str = "wide") -> tuple[float, float, float]:
    """Grid-search Eq. 11's alpha, beta (beta over the grid `beta_grid` of BETA_GRIDS) on `val`, write
    FOLDER/alpha_beta.json (+ heatmap) -> (alpha, beta, top-1 %). FOLDER is the run folder, or the scratch
    folder of `distill --select-best-on-val`."""
    betas = beta_grid_of(beta_grid)
    v_ce, v_kd, v_labels = labeled_only(*collect_logits(student, val, batch_size, device, workers))
    v_ce, v_kd = restrict(v_ce, v_kd, columns)
    alpha, beta, grid = search_alpha_beta(v_ce, v_kd, v_labels, beta_grid=betas)
    best = float(grid[ALPHA_GRID.index(alpha), betas.index(beta)])
    run = RunDir(folder)
    previous = run.read_alpha_beta() if announce else None
    if previous is not None:  # never replaced silently: the earlier choice is kept beside it and named
        write_atomic(run.path / ALPHA_BETA_PREVIOUS, lambda part: shutil.copyfile(run.alpha_beta, part))
        same = (previous["alpha"], previous["beta"]) == (alpha, beta)
        print(f"{run.alpha_beta}: replacing the earlier choice alpha={previous['alpha']:g}, "
              f"beta={previous['beta']:g} (searched on {previous.get('search_on', '?')}) with alpha={alpha:g}, beta={beta:g}"
              f"{' (the same)' if same else ''}; the earlier one is kept as {ALPHA_BETA_PREVIOUS}", file=sys.stderr, flush=True)
    write_json(run.alpha_beta, {
        "alpha": alpha, "beta": beta,
        "search_on": str(val.root), "search_on_fingerprint": val.fingerprint, "num_samples": int(len(v_labels)),
        "alpha_grid": list(ALPHA_GRID), "beta_grid": list(betas), "beta_grid_name": beta_grid,
        "top1_grid": [[round(float(v), 4) for v in row] for row in grid],  # rows: alpha, columns: beta
        "best_top1": best, **(extra or {}),
    })
    heatmap = plot_alpha_beta(grid, run.heatmap, beta_grid=betas, best=(alpha, beta), title=f"top-1 (%) on {val.root.name}, Eq. 11")
    if announce:
        print(f"alpha={alpha:g}, beta={beta:g} (top-1 {best:.2f} on {val.root}) -> {run.alpha_beta}; "
              f"heatmap {heatmap}", file=sys.stderr, flush=True)
    return alpha, beta, best


def evaluate(
    run_dir: Union[str, Path],
    data: Union[str, Path, data_lib.Dataset],
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    search_on: Union[str, Path, data_lib.Dataset, None] = None,
    batch_size: int = 256,
    device: Union[str, torch.device] = "auto",
    workers: int = 2,
    beta_grid: str = "wide",
    views: str = "center",
    draws: Optional[int] = None,
    seed: Optional[int] = None,
    weights: Optional[str] = None,
    tome_r: Optional[int] = None,
) -> dict:
    """Top-1/top-5 (%) of ce_head, kd_head and their combination (Eq. 11) on `data`.

    Returns {ce_head: {top1, top5}, kd_head: {...}, combined: {...}, alpha, beta,
    alpha_beta_source, num_samples, num_unlabeled_ignored, num_classes, data, data_fingerprint}.
    Samples of `data` labeled -1 are left out (counted in num_unlabeled_ignored). A dataset whose
    classes are a subset of the model's is scored on its classes only (`class_columns`; class_subset
    true, num_classes its classes, model_classes the model's).
    With `search_on`, (alpha, beta) are grid-searched on that validation dataset first (beta over the grid
    `beta_grid` of BETA_GRIDS) and stored in RUN_DIR/alpha_beta.json (+ alpha_beta_heatmap.png).
    `views` "center" (default) scores the evaluation view; "random" scores `draws` (default 1) passes of random
    training views, draw d of image `key` seeded by (`seed` (default 0), key, d) (the reference's Table 4 way): the
    head metrics are the mean over the draws, followed by views, draws, seed, per_draw (each draw's head metrics)
    and std (sample std over the draws; null for one draw). The search of `search_on` uses the center view.
    `tome_r`: the student merges that many tokens per block (ToMe, ViT students; the search too), its settings
    under "tome" (`dho.tome.apply_tome`); 0 is the unmerged model.
    """
    run_dir = Path(run_dir)
    check_choice("--views", views, VIEWS)
    if views == "center" and (draws is not None or seed is not None):
        raise ConfigError("--draws and --seed choose random views: add --views random (the center view is one fixed view)")
    draws = 1 if draws is None else draws
    seed = 0 if seed is None else seed
    check_number("--draws", draws, low=1, integer=True)
    check_number("--seed", seed, low=0, high=2**32 - 1, integer=True)
    if search_on is not None and (alpha is not None or beta is not None):
        raise ConfigError("give either --alpha/--beta or --search-on VAL, not both")
    if alpha is not None:
        check_number("--alpha", alpha, low=0, high=1)
    if beta is not None:
        check_number("--beta", beta, low=0, low_open=True)
    check_number("--batch-size", batch_size, low=1, integer=True)
    check_number("--workers", workers, low=0, integer=True)
    beta_grid_of(beta_grid)
    student, meta = load_run(run_dir, device, weights, tome_r)
    device = resolve_device(device)
    ds, columns = open_labeled(data, meta["classnames"], "--data")

    if search_on is not None:
        val, val_columns = open_labeled(search_on, meta["classnames"], "--search-on")
        if val.fingerprint == ds.fingerprint:
            raise ConfigError(
                f"--search-on {val.root} is the same data as --data {ds.root} (fingerprint {ds.fingerprint[:12]}): alpha/beta "
                "searched on the data they are scored on would overstate its top-1; search on a split apart from --data "
                "(a validation split: `dho split --val-out`)"
            )
        alpha, beta, _ = search_and_store(run_dir, student, val, batch_size, device, workers, columns=val_columns,
                                          beta_grid=beta_grid)
        source = f"search on {val.root}"
    else:
        stored = read_alpha_beta(run_dir)
        if stored is not None and stored.get("search_on_fingerprint") == ds.fingerprint and (alpha is None or beta is None):
            raise ConfigError(
                f"{run_dir / ALPHA_BETA_FILE} was searched on {ds.root} itself: scored with that choice its top-1 would be "
                "overstated; pass --alpha/--beta, or --search-on a split apart from --data"
            )
        run_alpha, run_beta, source = run_alpha_beta(run_dir, meta)
        if alpha is not None or beta is not None:
            source = "explicit" if alpha is not None and beta is not None else f"explicit + {source}"
        alpha = run_alpha if alpha is None else float(alpha)
        beta = run_beta if beta is None else float(beta)

    passes = [None] if views == "center" else list(range(draws))  # the center view, or random draws 0 ... N-1
    per_draw = []
    for draw in passes:
        ce, kd, labels = collect_logits(student, ds, batch_size, device, workers, draw=draw, seed=seed)
        num_unlabeled = int((labels < 0).sum())
        ce, kd, labels = labeled_only(ce, kd, labels)
        ce, kd = restrict(ce, kd, columns)  # (N, C_ds): a subset dataset is scored on its classes only
        per_draw.append(head_metrics(ce, kd, labels, alpha, beta))
    if views == "center":
        heads, spread = per_draw[0], {}
    else:
        heads = {h: {m: sum(p[h][m] for p in per_draw) / draws for m in ("top1", "top5")} for h in HEADS}
        std = None if draws == 1 else {
            h: {m: float(np.std([p[h][m] for p in per_draw], ddof=1)) for m in ("top1", "top5")} for h in HEADS}
        spread = {"views": views, "draws": draws, "seed": seed, "per_draw": per_draw, "std": std}

    return {
        **heads,
        "alpha": alpha,
        "beta": beta,
        "alpha_beta_source": source,
        "num_samples": int(len(labels)),
        "num_unlabeled_ignored": num_unlabeled,
        "num_classes": ds.num_classes,
        "model_classes": len(meta["classnames"]),
        "class_subset": columns is not None,
        "data": str(ds.root),
        "data_fingerprint": ds.fingerprint,
        **spread,
        **({"tome": meta["tome"]} if "tome" in meta else {}),
    }


def load_image(path: Union[str, Path]):
    """An image file as an RGB PIL image; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"image {path} not found")
    return data_lib.decode_image(path.read_bytes(), path.suffix.lstrip(".") or "image", str(path),
                                 fix="the file is damaged or not an image: leave it out, or convert it (e.g. to .png)")


def image_paths(images: Sequence[Union[str, Path]]) -> list[Path]:
    """The image files `images` name, in order: a folder stands for the image files in it (sorted, not recursive),
    a pattern with * ? [ that is not itself a file for the files it matches (sorted; ** recurses). Every one must exist."""
    paths = []
    for p in map(Path, images):
        if not p.exists() and any(c in str(p) for c in "*?["):  # a quoted glob: expanded here, sorted
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise DatasetError(f"the pattern {p} matches no image file; check it (quote it so the shell leaves it to dho)")
            paths += matches
            continue
        if p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                            and f.suffix[1:].lower() in data_lib.IMAGE_EXTS)
            if not inside:
                raise DatasetError(f"{p} is a folder without image files ({', '.join(data_lib.IMAGE_EXTS)}); give image files")
            paths += inside
        else:
            paths.append(p)
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"image {p} not found")
    return paths


@torch.no_grad()
def head_probs(student: DualHeadStudent, x: torch.Tensor, alpha: float, beta: float, heads: bool = False) -> dict[str, torch.Tensor]:
    """Normalised views (B, 3, S, S) on the student's device -> {combined (Eq. 11)[, ce_head, kd_head]: probs (B, C)}
    on the CPU: what `dho predict` prints (ce_head a plain softmax, kd_head one at temperature beta)."""
    out = student(x)
    scores = {"combined": combine_heads(out["ce_logits"], out["kd_logits"], alpha, beta).cpu()}  # (B, C)
    if heads:
        scores["ce_head"] = torch.softmax(out["ce_logits"].float(), dim=-1).cpu()  # (B, C)
        scores["kd_head"] = torch.softmax(out["kd_logits"].float() / beta, dim=-1).cpu()  # (B, C)
    return scores


PREDICT_BATCH = 64  # images per forward pass of `dho predict` (and of the Python API's predict)


@torch.no_grad()
def predict(
    run_dir: Union[str, Path],
    images: Sequence[Union[str, Path]],
    topk: int = 5,
    device: Union[str, torch.device] = "auto",
    batch_size: int = PREDICT_BATCH,
    heads: bool = False,
    weights: Optional[str] = None,
    tome_r: Optional[int] = None,
) -> list[tuple[Path, Union[list[tuple[str, float]], dict[str, list[tuple[str, float]]]]]]:
    """Top-k (class name, probability) per image from the combined heads (Eq. 11) with the run's alpha, beta.
    With `heads`, a dict per image: the top-k of ce_head (softmax), kd_head (softmax at temperature beta)
    and the combination, as the paper's qualitative figures (Figs. 9, 16-19) show them side by side.
    A folder among `images` stands for the image files in it (sorted, not recursive). `tome_r`: the student merges
    that many tokens per block (ToMe, ViT students)."""
    check_number("--topk", topk, low=1, integer=True)
    paths = image_paths(images)
    student, meta = load_run(run_dir, device, weights, tome_r)
    alpha, beta, _ = run_alpha_beta(run_dir, meta)
    preprocess: data_lib.Preprocessing = meta["preprocess"]
    classnames = meta["classnames"]
    k = min(topk, len(classnames))
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x = torch.stack([preprocess.eval_view(load_image(p)) for p in chunk])  # (B, 3, S, S)
        scores = head_probs(student, x.to(resolve_device(device)), alpha, beta, heads)
        tops = {name: probs.topk(k, dim=-1) for name, probs in scores.items()}
        for i, p in enumerate(chunk):
            per = {name: [(classnames[c], v) for c, v in zip(t.indices[i].tolist(), t.values[i].tolist())]
                   for name, t in tops.items()}
            results.append((p, {h: per[h] for h in ("ce_head", "kd_head", "combined")} if heads else per["combined"]))
    return results
