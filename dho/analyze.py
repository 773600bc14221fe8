"""Analyses of a finished run: the two heads' predictions (Fig. 15) and weights (Fig. 13, left), the
features z = g(x) (their spectrum, a linear probe: Table 3, a t-SNE map: Fig. 7), and z as files.

    head_agreement   Fig. 15: max-probability histograms of ce_head, kd_head and Eq. 11; the four
                     outcomes (both correct, only one correct, both wrong); error reduction: of the
                     samples one head fails, how many the combined output still fails; per-class top-1
    feature_spectrum eigenvalues of the covariance of z, explained variance, effective rank
    head_spectra     Fig. 13 (left): dominant eigenvalue of W W^T of each head and of W_CE W_KD^T
    linear_probe     Fig. 7 / Table 3: freeze g, fit a new linear softmax head on z of labeled data
    plot_tsne        Fig. 7: a t-SNE map of z (needs the optional scikit-learn)
    pick_examples    Figs. 9, 16-19: samples where one head is right and the other wrong, drawn by
                     plot_examples as an image grid with both heads' (and Eq. 11's) top predictions
    export_features  z of every sample of a dataset as .npy (+ labels, + a JSON that describes them)
    analyze          runs the student once over a dataset and writes RUN/analysis/<data>/:
                     heads.json/.png, spectrum.json/.png, probe.json (with probe_train), tsne.png

Percentages are of the labeled samples of the analysed dataset (labels -1 are left out); the
spectrum uses every sample, labeled or not. alpha and beta are the run's (``run_alpha_beta``); a
stored ``alpha_beta.json`` searched on the analysed data itself is refused, as in ``evaluate``.

Out of scope: anything over the course of training (Fig. 4, Fig. 13 right, the eigenvalues'
trajectory: ``distill --log-grad-cosine`` logs those), distributed or multi-crop analysis.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dho
from dho import data as data_lib
from dho.atomic import write_atomic
from dho.devices import resolve_device
from dho.errors import ConfigError, check_number
from dho.evaluate import (collect_logits, combine_heads, load_run, open_labeled, read_alpha_beta, restrict, run_alpha_beta,
                          topk_accuracy)
from dho.progress import Progress
from dho.run_dir import ALPHA_BETA, RunDir, write_json
from dho.students import DualHeadStudent, MLPHead, dominant_eigenvalue, head_input, head_weight

CATEGORIES = ("both_correct", "ce_only", "kd_only", "both_wrong")  # Fig. 15 (middle)
MAX_PROB_BINS = tuple(round(0.05 * i, 2) for i in range(21))  # 20 bins of width 0.05 on [0, 1], Fig. 15 (left)
VARIANCE_LEVELS = (90, 99)  # % of variance: components needed, as a compact summary of the spectrum
PROBE_EPOCHS = 90  # the linear evaluation protocol's 90 epochs (Chen et al., 2020b)
PROBE_MIN_STEPS = 1000  # small (few-shot) sets get more epochs: Adam's per-weight steps need ~1000 to settle
PROBE_LR = 1e-2  # AdamW on standardised features, cosine to 0; 1e-3 underfits within 1000 steps
PROBE_WEIGHT_DECAY = 1e-4  # decoupled (AdamW); a light regulariser on the probe's weights
PROBE_BATCH_SIZE = 256
TSNE_MAX_POINTS = 2000  # a readable map; t-SNE's time grows with N
PER_CLASS_YMAX = 125  # heads.png's per-class panel: bars up to 100%, the legend in the band above
EXAMPLE_KINDS = ("ce_only", "kd_only")  # Figs. 9, 16-19: one head right and the other wrong
EXAMPLE_TOPK = 3  # predictions shown per head under each image


# --------------------------------------------------------------------------------------------
# math: the two heads (Fig. 15)
# --------------------------------------------------------------------------------------------


def head_agreement(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    classnames: Optional[Sequence[str]] = None,
    bins: Sequence[float] = MAX_PROB_BINS,
) -> dict:
    """How ce_head, kd_head and their combination (Eq. 11) succeed and fail together (Fig. 15).

    Every number is in % of the N samples unless said otherwise:
      top1                    {ce_head, kd_head, combined}
      both_correct, ce_only, kd_only, both_wrong   the four outcomes of the two heads (sum 100)
      agreement               the heads' argmaxes are equal (right or wrong alike)
      same_outcome            both_correct + both_wrong: the heads are right or wrong together
                              (the paper's "the two heads agree in 76.2% of cases" is this one:
                              76.2 + 11.5 + 12.4 = 100.1)
      combined_top1_given     top-1 of Eq. 11 within each outcome, in % of that outcome (None if empty)
      error_reduction         kd_head: {failed: ce_only, still_failed: ce_only and Eq. 11 wrong};
                              ce_head: {failed: kd_only, still_failed: kd_only and Eq. 11 wrong}
                              (the paper: "from 11.5% to 2.5% for the KD head")
      max_prob                counts of the max probability of softmax(ce), softmax(kd / beta) and
                              Eq. 11 over `bins` (the last bin includes 1), and their means
      per_class               [{class, num_samples, ce_head, kd_head, combined}] top-1 per class
    A head's prediction is the argmax of its logits; labels must be in [0, C).
    """
    ce_logits = torch.as_tensor(ce_logits).float()  # (N, C)
    kd_logits = torch.as_tensor(kd_logits).float()  # (N, C)
    labels = torch.as_tensor(labels).long()  # (N,)
    n, c = ce_logits.shape
    if kd_logits.shape != (n, c) or labels.shape != (n,) or n == 0:
        raise ConfigError(f"head_agreement needs ce/kd logits (N, C) and labels (N,) with N > 0; got "
                          f"{tuple(ce_logits.shape)}, {tuple(kd_logits.shape)}, {tuple(labels.shape)}")
    if bool((labels < 0).any()) or bool((labels >= c).any()):
        raise ConfigError(f"head_agreement needs labels in [0, {c}); leave unlabeled samples (-1) out first")
    classnames = [str(k) for k in range(c)] if classnames is None else list(classnames)
    if len(classnames) != c:
        raise ConfigError(f"{len(classnames)} class names for {c} classes")

    p = combine_heads(ce_logits, kd_logits, alpha, beta)  # (N, C); checks alpha and beta
    p_ce = torch.softmax(ce_logits, dim=-1)  # (N, C)
    p_kd = torch.softmax(kd_logits / beta, dim=-1)  # (N, C)
    pred_ce, pred_kd = ce_logits.argmax(-1), kd_logits.argmax(-1)  # (N,)
    ce_ok, kd_ok, ok = pred_ce == labels, pred_kd == labels, p.argmax(-1) == labels  # (N,) bool
    masks = {"both_correct": ce_ok & kd_ok, "ce_only": ce_ok & ~kd_ok,
             "kd_only": ~ce_ok & kd_ok, "both_wrong": ~ce_ok & ~kd_ok}

    def pct(mask: torch.Tensor, of: Optional[torch.Tensor] = None) -> Optional[float]:
        total = n if of is None else int(of.sum())
        return None if total == 0 else 100.0 * int(mask.sum()) / total

    def hist(probs: torch.Tensor) -> list[int]:
        counts, _ = np.histogram(probs.max(-1).values.double().numpy(), bins=np.asarray(bins, dtype=np.float64))
        return [int(k) for k in counts]

    per_label = torch.bincount(labels, minlength=c).tolist()  # (C,)
    hits = {name: torch.bincount(labels[right], minlength=c).tolist()  # (C,) correct per class
            for name, right in (("ce_head", ce_ok), ("kd_head", kd_ok), ("combined", ok))}
    per_class = [{"class": name, "num_samples": per_label[k],
                  **{head: (100.0 * hits[head][k] / per_label[k] if per_label[k] else None) for head in hits}}
                 for k, name in enumerate(classnames)]
    return {
        "num_samples": n,
        "num_classes": c,
        "alpha": float(alpha),
        "beta": float(beta),
        "top1": {"ce_head": pct(ce_ok), "kd_head": pct(kd_ok), "combined": pct(ok)},
        **{name: pct(mask) for name, mask in masks.items()},
        "agreement": pct(pred_ce == pred_kd),
        "same_outcome": pct(ce_ok == kd_ok),
        "combined_top1_given": {name: pct(ok & mask, mask) for name, mask in masks.items()},
        "error_reduction": {
            "kd_head": {"failed": pct(masks["ce_only"]), "still_failed": pct(masks["ce_only"] & ~ok)},
            "ce_head": {"failed": pct(masks["kd_only"]), "still_failed": pct(masks["kd_only"] & ~ok)},
        },
        "max_prob": {
            "bin_edges": [float(b) for b in bins],
            "ce_head": hist(p_ce), "kd_head": hist(p_kd), "combined": hist(p),
            "mean": {"ce_head": float(p_ce.max(-1).values.double().mean()),
                     "kd_head": float(p_kd.max(-1).values.double().mean()),
                     "combined": float(p.max(-1).values.double().mean())},
        },
        "per_class": per_class,
    }


# --------------------------------------------------------------------------------------------
# math: spectra (Fig. 13)
# --------------------------------------------------------------------------------------------


def feature_spectrum(z: Union[torch.Tensor, np.ndarray], chunk: int = 65536) -> dict:
    """Eigenvalues of the covariance of the features z (N, D) (divisor N - 1, as np.cov), in float64.

    Returns {num_samples, dim, eigenvalues (D, descending, as computed: tiny negatives are rounding),
    explained_variance (D, fractions of the total, negatives counted as 0), total_variance,
    effective_rank = exp(entropy of the explained-variance fractions) (Roy & Vetterli, 2007; D for
    isotropic features, 1 for features on a line), components_90 / components_99 = the fewest
    leading components holding 90 / 99 % of the variance}. Constant features: effective rank 0.
    The covariance is accumulated over row chunks, so z need not fit in memory twice in float64.
    """
    z = torch.as_tensor(z)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ConfigError(f"feature_spectrum needs features (N, D) with N >= 2; got {tuple(z.shape)}")
    n, d = z.shape
    mean = torch.zeros(d, dtype=torch.float64)
    for start in range(0, n, chunk):
        mean += z[start:start + chunk].double().sum(0)
    mean /= n  # (D,)
    cov = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n, chunk):
        zc = z[start:start + chunk].double() - mean  # (B, D)
        cov += zc.T @ zc
    cov /= n - 1  # (D, D)
    eig = np.linalg.eigvalsh(cov.numpy())[::-1].copy()  # (D,) descending
    pos = np.clip(eig, 0.0, None)
    total = float(pos.sum())
    explained = pos / total if total > 0 else np.zeros_like(pos)  # (D,)
    nonzero = explained[explained > 0]
    effective_rank = float(np.exp(-(nonzero * np.log(nonzero)).sum())) if total > 0 else 0.0
    cumulative = np.cumsum(explained)
    components = {f"components_{level}": (int(min(np.searchsorted(cumulative, level / 100.0 - 1e-12) + 1, d)) if total > 0 else 0)
                  for level in VARIANCE_LEVELS}  # 1e-12: a sum of fractions that is exactly the level in reals
    return {
        "num_samples": int(n),
        "dim": int(d),
        "eigenvalues": [float(v) for v in eig],
        "explained_variance": [float(v) for v in explained],
        "total_variance": total,
        "effective_rank": effective_rank,
        **components,
    }


def head_spectra(student: DualHeadStudent) -> dict:
    """Fig. 13 (left) for one model: the dominant eigenvalue of W W^T of ce_head (ce_head) and of
    kd_head (kd_head), and of W_CE W_KD^T (ce_kd: not symmetric, the eigenvalue of largest
    magnitude, real part), on the heads' effective weights (``dho.students.head_weight``: W of a
    linear head; for the aligned kd_head of VLM students the matrix acting on n(z) = z / ||z||, 1/zeta
    included), computed as ``distill --log-grad-cosine`` logs them during training. Also names the
    input each head's W multiplies (z or n(z); an mlp head's last layer: its own hidden h(z) or n(h(z)), so
    with an mlp head ce_kd is None: the two matrices act on different spaces)."""
    w_ce, w_kd = head_weight(student.ce_head), head_weight(student.kd_head)  # (C, D) or (C, H)
    mlp = any(isinstance(h, MLPHead) for h in (student.ce_head, student.kd_head))
    return {
        "ce_head": dominant_eigenvalue(w_ce),
        "kd_head": dominant_eigenvalue(w_kd),
        "ce_kd": None if mlp else dominant_eigenvalue(w_ce, w_kd),
        "ce_head_input": head_input(student.ce_head),
        "kd_head_input": head_input(student.kd_head),
    }


def _eig(value: Optional[float], spec: str) -> str:
    """An eigenvalue as text; None (W_CE W_KD^T with an mlp head) as 'n/a (mlp head)'."""
    return "n/a (mlp head)" if value is None else format(value, spec)


# --------------------------------------------------------------------------------------------
# math: linear probe (Fig. 7 / Table 3)
# --------------------------------------------------------------------------------------------


def linear_probe(
    train_z: Union[torch.Tensor, np.ndarray],
    train_y: Union[torch.Tensor, np.ndarray],
    test_z: Union[torch.Tensor, np.ndarray],
    test_y: Union[torch.Tensor, np.ndarray],
    epochs: int = PROBE_EPOCHS,
    lr: float = PROBE_LR,
    weight_decay: float = PROBE_WEIGHT_DECAY,
    batch_size: int = PROBE_BATCH_SIZE,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    num_classes: Optional[int] = None,
    min_steps: int = PROBE_MIN_STEPS,
) -> dict:
    """Linear evaluation of frozen features (Table 3): a new linear head h_LE on z, trained with
    the labeled training data, top-1/top-5 (%) on the test data.

    Protocol: features standardised with the training set's per-dimension mean and std (std 0 ->
    1); a linear softmax classifier (weights and bias zero-initialised: the problem is convex, so the
    start does not matter and needs no random numbers); cross-entropy; AdamW(lr, weight_decay,
    betas 0.9/0.999) over shuffled mini-batches (order from a torch.Generator seeded with `seed`),
    cosine learning rate decay to 0 over all steps, no augmentation (one view per image, the
    evaluation view). `epochs` passes over the data, raised so that at least `min_steps` steps are
    taken (few-shot training sets are a few batches). The paper follows Chen et al. (2020b), who
    train 90 epochs of SGD / LARS on ImageNet; AdamW on standardised features is this project's
    choice. Deterministic on one machine.

    Returns {top1, top5, train_top1, final_loss (mean training loss of the last epoch), num_train,
    num_test, num_classes, dim, epochs (as run), steps, lr, weight_decay, batch_size, seed}.
    """
    check_number("epochs", epochs, low=1, integer=True)
    check_number("min_steps", min_steps, low=0, integer=True)
    check_number("lr", lr, low=0, low_open=True)
    check_number("weight_decay", weight_decay, low=0)
    check_number("batch_size", batch_size, low=1, integer=True)
    device = resolve_device(device)
    train_z, test_z = torch.as_tensor(train_z).float(), torch.as_tensor(test_z).float()  # (N, D), (M, D)
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()  # (N,), (M,)
    if train_z.ndim != 2 or test_z.ndim != 2 or train_z.shape[1] != test_z.shape[1] or len(train_z) == 0 or len(test_z) == 0:
        raise ConfigError(f"linear_probe needs train and test features (N, D) of one D; got {tuple(train_z.shape)}, {tuple(test_z.shape)}")
    if train_y.shape != (len(train_z),) or test_y.shape != (len(test_z),):
        raise ConfigError("linear_probe needs one label per feature row")
    c = int(max(train_y.max(), test_y.max())) + 1 if num_classes is None else int(num_classes)
    for what, y in (("train", train_y), ("test", test_y)):
        if bool((y < 0).any()) or bool((y >= c).any()):
            raise ConfigError(f"linear_probe: {what} labels must be in [0, {c}); leave unlabeled samples (-1) out first")
    n, d = train_z.shape

    mean = train_z.mean(0)  # (D,)
    std = train_z.std(0, unbiased=False)  # (D,)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x_train, x_test = (train_z - mean) / std, (test_z - mean) / std  # (N, D), (M, D)

    head = nn.Linear(d, c).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(n / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total)))
    gen = torch.Generator().manual_seed(seed)
    progress = Progress("linear probe", epochs, unit="epochs", final=False)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)  # (N,)
        loss_sum = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            logits = head(x_train[idx].to(device))  # (B, C)
            loss = F.cross_entropy(logits, train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        progress.update(1)

    @torch.no_grad()
    def scores(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x[i:i + 8192].to(device)).float().cpu() for i in range(0, len(x), 8192)])  # (N, C)

    test_acc = topk_accuracy(scores(x_test), test_y, ks=(1, 5))
    return {
        "top1": test_acc[1],
        "top5": test_acc[5],
        "train_top1": topk_accuracy(scores(x_train), train_y, ks=(1,))[1],
        "final_loss": loss_sum / n,
        "num_train": int(n),
        "num_test": int(len(test_z)),
        "num_classes": c,
        "dim": int(d),
        "epochs": epochs,
        "steps": total,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "seed": seed,
    }


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> Path:
    """Write a figure as PNG whole or not at all."""
    write_atomic(path, lambda part: fig.savefig(part, dpi=120, format="png"))
    _pyplot().close(fig)
    return path


def plot_heads(heads: dict, path: Union[str, Path], title: str = "") -> Path:
    """Fig. 15 from a ``head_agreement`` result as a PNG (``heads_figure``)."""
    return _save_figure(heads_figure(heads, title), Path(path))


def heads_figure(heads: dict, title: str = ""):
    """Fig. 15 from a ``head_agreement`` result: max-probability histograms, the four outcomes,
    error reduction, and (a fourth panel) per-class top-1 of each head and of Eq. 11."""
    plt = _pyplot()
    colours = {"ce_head": "tab:blue", "kd_head": "tab:orange", "combined": "tab:green"}
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))

    ax = axes[0]
    edges = np.asarray(heads["max_prob"]["bin_edges"])
    for name, colour in colours.items():
        counts = 100.0 * np.asarray(heads["max_prob"][name]) / heads["num_samples"]
        ax.stairs(counts, edges, color=colour, linewidth=1.8,
                  label=f"{name} (mean {heads['max_prob']['mean'][name]:.2f})")
    ax.set_xlabel("maximum probability")
    ax.set_ylabel("samples (%)")
    ax.set_title(f"max probability (kd_head at beta={heads['beta']:g})")
    ax.legend(fontsize=8)

    ax = axes[1]
    labels = ["both\ncorrect", "only CE\ncorrect", "only KD\ncorrect", "both\nwrong"]
    values = [heads[name] for name in CATEGORIES]
    bars = ax.bar(labels, values, color=["tab:green", "tab:blue", "tab:orange", "tab:red"])
    for bar, name in zip(bars, CATEGORIES):
        given = heads["combined_top1_given"][name]
        note = "" if given is None else f"\ncombined\n{given:.0f}% right"  # narrow: neighbouring bars' notes never touch
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{bar.get_height():.1f}%{note}",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(values) * 1.4 + 1)
    ax.set_ylabel("samples (%)")
    ax.set_title(f"prediction agreement (argmax equal: {heads['agreement']:.1f}%)")

    ax = axes[2]
    reduction = heads["error_reduction"]
    x = np.arange(2)
    failed = [reduction["kd_head"]["failed"], reduction["ce_head"]["failed"]]
    still = [reduction["kd_head"]["still_failed"], reduction["ce_head"]["still_failed"]]
    for offset, vals, label, colour in ((-0.2, failed, "single head fails", "tab:red"),
                                        (0.2, still, "combined still fails", "tab:green")):
        bars = ax.bar(x + offset, vals, 0.4, label=label, color=colour)
        for bar in bars:
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{bar.get_height():.1f}%",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, ["kd_head fails\n(ce_head right)", "ce_head fails\n(kd_head right)"])
    ax.set_ylim(0, max(failed + still) * 1.45 + 1)  # the band above the bars holds the legend
    ax.set_ylabel("samples (%)")
    ax.set_title("error reduction")
    ax.legend(fontsize=8, ncol=2, loc="upper center", frameon=False)

    ax = axes[3]  # the legend sits in a band above 100%, where no bar or curve reaches
    rows = [r for r in heads["per_class"] if r["num_samples"] > 0]
    if len(rows) <= 30:
        x = np.arange(len(rows))
        for offset, (name, colour) in zip((-0.27, 0, 0.27), colours.items()):
            ax.bar(x + offset, [r[name] for r in rows], 0.27, color=colour, label=name)
        ax.set_xticks(x, [r["class"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("class")
    else:  # too many classes for bars: each curve sorted on its own
        for name, colour in colours.items():
            ax.plot(np.sort([r[name] for r in rows])[::-1], color=colour, label=name)
        ax.set_xlabel("classes, sorted by top-1 per curve")
    ax.set_ylim(0, PER_CLASS_YMAX)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("top-1 (%)")
    ax.set_title("per-class top-1")
    ax.legend(fontsize=8, ncol=3, loc="upper center", frameon=False)

    top1 = heads["top1"]
    fig.suptitle(f"{title}  top-1: ce_head {top1['ce_head']:.2f}, kd_head {top1['kd_head']:.2f}, combined "
                 f"{top1['combined']:.2f} (alpha={heads['alpha']:g}, beta={heads['beta']:g}, N={heads['num_samples']})",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_spectrum(spectrum: dict, path: Union[str, Path], heads: Optional[dict] = None, title: str = "") -> Path:
    """The feature spectrum as a PNG (``spectrum_figure``)."""
    return _save_figure(spectrum_figure(spectrum, heads, title), Path(path))


def spectrum_figure(spectrum: dict, heads: Optional[dict] = None, title: str = ""):
    """Log-scale eigenvalues of the feature covariance with the cumulative explained variance, over the first
    min(N, D) components (N samples span at most N - 1 directions: the rest are zero)."""
    plt = _pyplot()
    shown = min(spectrum["num_samples"], spectrum["dim"])
    eig = np.asarray(spectrum["eigenvalues"])[:shown]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    k = np.arange(1, len(eig) + 1)
    keep = eig > (eig.max() * 1e-12 if eig.max() > 0 else 0)  # rounding noise and zeros have no log
    ax.semilogy(k[keep], eig[keep], color="tab:blue", label="eigenvalue")
    ax.set_xlabel("component")
    ax.set_ylabel("eigenvalue of cov(z)")
    twin = ax.twinx()
    twin.plot(k, 100.0 * np.cumsum(spectrum["explained_variance"])[:shown], color="tab:gray", linestyle="--",
              label="cumulative variance (%)")
    twin.set_ylabel("cumulative explained variance (%)")
    twin.set_ylim(0, 101)
    ax.set_xlim(0.5, shown + 0.5)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # components are counted
    for i, level in enumerate(VARIANCE_LEVELS):  # labelled low on the axes: the cumulative curve runs along the top
        count = spectrum[f"components_{level}"]
        if count:
            ax.axvline(count, color="tab:red", linewidth=0.8, alpha=0.6)
            twin.text(count, 8 + 8 * i, f" {level}%: {count}", fontsize=8, va="bottom", color="tab:red")
    text = f"effective rank {spectrum['effective_rank']:.1f} of D={spectrum['dim']} (N={spectrum['num_samples']})"
    if heads is not None:
        text += (f"\nlambda_max: W_CE W_CE^T {heads['ce_head']:.3g}, W_KD W_KD^T {heads['kd_head']:.3g}, "
                 f"W_CE W_KD^T {_eig(heads['ce_kd'], '.3g')}")
    ax.set_title(f"{title}\n{text}" if title else text, fontsize=9)
    fig.tight_layout()
    return fig


def _require_sklearn():
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ConfigError("t-SNE needs scikit-learn, an optional dependency: pip install scikit-learn") from None
    return TSNE


def plot_tsne(
    z: Union[torch.Tensor, np.ndarray],
    labels: Union[torch.Tensor, np.ndarray],
    path: Union[str, Path],
    max_points: int = TSNE_MAX_POINTS,
    seed: int = 0,
    classnames: Optional[Sequence[str]] = None,
    title: str = "t-SNE of z",
) -> Path:
    """A t-SNE map (Fig. 7) of features z (N, D) coloured by label, of at most `max_points` samples
    (a seeded random subset, kept in dataset order). Needs scikit-learn."""
    TSNE = _require_sklearn()
    check_number("max_points", max_points, low=2, integer=True)
    z, labels = np.asarray(z, dtype=np.float32), np.asarray(labels)  # (N, D), (N,)
    if z.ndim != 2 or labels.shape != (len(z),) or len(z) < 2:
        raise ConfigError(f"t-SNE needs features (N, D), N >= 2, and one label per row; got {z.shape}, {labels.shape}")
    if len(z) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(z), max_points, replace=False))
        z, labels = z[keep], labels[keep]
    perplexity = min(30.0, (len(z) - 1) / 3.0)  # sklearn needs perplexity < N; 30 is its default
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)  # (N, 2)
    plt = _pyplot()
    classes = np.unique(labels)
    fig, ax = plt.subplots(figsize=(8.0 if len(classes) <= 20 else 6.5, 6))
    cmap = plt.get_cmap("tab20" if len(classes) <= 20 else "nipy_spectral")
    for i, k in enumerate(classes):
        at = labels == k
        name = classnames[k] if classnames is not None and 0 <= k < len(classnames) else str(k)
        ax.scatter(xy[at, 0], xy[at, 1], s=8, color=cmap(i / max(len(classes) - 1, 1)), label=name)
    if len(classes) <= 20:  # beside the map, never over its points
        ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} ({len(z)} samples, perplexity {perplexity:.1f})", fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def pick_examples(
    ce_logits: torch.Tensor,
    kd_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    n: int,
    topk: int = EXAMPLE_TOPK,
) -> dict[str, list[dict]]:
    """Figs. 9 and 16-19: for each kind of EXAMPLE_KINDS (``ce_only``: ce_head right, kd_head wrong; ``kd_only``: the
    converse) up to `n` samples, the clearest first: ranked by the right head's probability of the true class minus
    the wrong head's (ties by row). Each: {row, label, p_true: {head: p}, top: {head: [[class, p], ...]}} with the
    heads as `dho predict --heads` shows them (ce_head softmax(ce), kd_head softmax(kd / beta), combined Eq. 11)."""
    check_number("--examples", n, low=1, integer=True)
    p = {"ce_head": torch.softmax(ce_logits.float(), dim=-1), "kd_head": torch.softmax(kd_logits.float() / beta, dim=-1)}
    p["combined"] = combine_heads(ce_logits, kd_logits, alpha, beta)  # (N, C)
    labels = torch.as_tensor(labels).long()  # (N,)
    right = {h: p[h].argmax(-1) == labels for h in ("ce_head", "kd_head")}  # (N,) each
    true = {h: p[h].gather(1, labels[:, None])[:, 0] for h in p}  # (N,) each: the probability of the true class
    k = min(topk, ce_logits.shape[-1])
    picked = {}
    for kind, good, bad in (("ce_only", "ce_head", "kd_head"), ("kd_only", "kd_head", "ce_head")):
        rows = torch.nonzero(right[good] & ~right[bad])[:, 0]  # (M,)
        margin = (true[good] - true[bad])[rows]
        order = sorted(range(len(rows)), key=lambda i: (-float(margin[i]), int(rows[i])))[:n]
        picked[kind] = []
        for i in order:
            r = int(rows[i])
            tops = {h: [[int(c), round(float(v), 6)] for v, c in zip(*p[h][r].topk(k))] for h in p}
            picked[kind].append({"row": r, "label": int(labels[r]), "p_true": {h: round(float(true[h][r]), 6) for h in p},
                                 "top": tops})
    return picked


def example_images(ds: data_lib.Dataset, rows: Sequence[int]) -> dict[int, "Image.Image"]:
    """The images of dataset rows `rows`, decoded from their shards only (each shard read once)."""
    from dho.data.reader import decode_image, iter_shard

    wanted, images = set(int(r) for r in rows), {}
    for s, shard in enumerate(ds.shards):
        if not any(shard.offset <= r < shard.offset + shard.count for r in wanted):
            continue
        for sample in iter_shard(ds, s, decode=False):
            if sample.index in wanted:
                images[sample.index] = decode_image(sample.data, sample.ext, f"{ds.root} key {sample.key!r}")
    return images


def plot_examples(examples: dict, images: dict, path: Union[str, Path], classnames: Sequence[str], keys: Sequence[str],
                  title: str = "") -> Path:
    """Figs. 9 / 16-19 as a PNG: a row per kind of `pick_examples`, each image with its key and true class, then each
    head's top predictions under it (the true class marked with *; which head is right is the row's label)."""
    plt = _pyplot()
    kinds = [k for k in EXAMPLE_KINDS if examples.get(k)]
    if not kinds:
        raise ConfigError("no sample has one head right and the other wrong: nothing to draw (both heads agree on "
                          "every sample, or both fail together)")
    cols = max(len(examples[k]) for k in kinds)
    fig, axes = plt.subplots(len(kinds), cols, figsize=(2.9 * cols, 3.9 * len(kinds)), squeeze=False)
    names = {"ce_head": "CE", "kd_head": "KD", "combined": "Eq.11"}
    for r, kind in enumerate(kinds):
        good = "ce_head" if kind == "ce_only" else "kd_head"
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(examples[kind]):
                ax.axis("off")
                continue
            e = examples[kind][c]
            ax.imshow(images[e["row"]])
            ax.set_title(f"{keys[e['row']][-18:]}\ntrue: {classnames[e['label']][:22]}", fontsize=7)
            lines = []
            for head in ("ce_head", "kd_head", "combined"):
                preds = ", ".join(f"{'*' if cls == e['label'] else ''}{classnames[cls][:12]} {100 * prob:.0f}%"
                                  for cls, prob in e["top"][head])
                mark = "" if head == "combined" else " (right)" if head == good else " (wrong)"
                lines.append(f"{names[head]}{mark}: {preds}")
            ax.set_xlabel("\n".join(lines), fontsize=6, loc="left")  # under the image; tight_layout makes room
        axes[r][0].set_ylabel({"ce_only": "ce_head right,\nkd_head wrong", "kd_only": "kd_head right,\nce_head wrong"}[kind],
                              fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96) if title else None)
    return _save_figure(fig, Path(path))


# --------------------------------------------------------------------------------------------
# files: features and the analysis folder
# --------------------------------------------------------------------------------------------


def _write_npy(path: Path, array: np.ndarray) -> Path:
    def write(part: Path) -> None:
        with open(part, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, array)

    return write_atomic(path, write)


def feature_files(out: Union[str, Path]) -> tuple[Path, Path, Path]:
    """The three files of ``export_features``: OUT (features), OUT.labels.npy, OUT.json."""
    out = Path(out)
    return out, out.with_suffix(".labels.npy"), out.with_suffix(".json")


def export_features(
    run_dir: Union[str, Path],
    data: Union[str, Path, data_lib.Dataset],
    out: Union[str, Path],
    batch_size: int = 256,
    device: Union[str, torch.device] = "auto",
    workers: int = 2,
) -> dict:
    """Write z = g(x) of every sample of `data` (evaluation view) in dataset order: OUT (float32
    (N, D) .npy), OUT.labels.npy (int64 (N,), -1 = unlabeled) and, last, OUT.json {run, data,
    fingerprint, keys, classnames (the dataset's: labels index them), shape, ...}. Each file is
    written whole or not at all. The dataset may have other classes than the run (e.g. for a
    linear probe on another task). Returns the JSON's content."""
    run_dir, out = Path(run_dir), Path(out)
    check_number("--batch-size", batch_size, low=1, integer=True)
    check_number("--workers", workers, low=0, integer=True)
    if out.suffix != ".npy" or out.is_dir():
        raise ConfigError(f"--out {out}: give a file name ending in .npy (e.g. {out.with_suffix('.npy').name}); "
                          "the labels and a JSON description are written beside it")
    features_file, labels_file, info_file = feature_files(out)
    student, meta = load_run(run_dir, device)
    ds = data if isinstance(data, data_lib.Dataset) else data_lib.Dataset.open(data)
    _, _, labels, z = collect_logits(student, ds, batch_size, device, workers, features=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_npy(features_file, z.numpy().astype(np.float32))
    _write_npy(labels_file, labels.numpy().astype(np.int64))
    info = {
        "format": "dho-features", "version": 1, "dho_version": dho.__version__,
        "run": str(run_dir), "student": meta["build_args"]["name"], "data": str(ds.root), "fingerprint": ds.fingerprint,
        "features": features_file.name, "labels": labels_file.name,
        "shape": [int(s) for s in z.shape], "dtype": "float32",
        "z": "g(x) of the evaluation view: the input of both heads, before any normalisation",
        "num_unlabeled": int((labels < 0).sum()), "classnames": ds.classnames, "keys": ds.keys,
    }
    write_json(info_file, info)
    return info


def analyze(
    run_dir: Union[str, Path],
    data: Union[str, Path, data_lib.Dataset],
    probe_train: Union[str, Path, data_lib.Dataset, None] = None,
    tsne: bool = False,
    batch_size: int = 256,
    device: Union[str, torch.device] = "auto",
    workers: int = 2,
    out_dir: Union[str, Path, None] = None,
    examples: Optional[int] = None,
) -> dict:
    """Run the student once over `data` (and once over `probe_train`) and write the analyses into
    OUT_DIR (default RUN_DIR/analysis/<data folder name>/):

      heads.json, heads.png        ``head_agreement`` with the run's alpha, beta (Fig. 15)
      spectrum.json, spectrum.png  ``feature_spectrum`` of z over every sample of `data` and
                                   ``head_spectra`` of the model (Fig. 13, left)
      probe.json                   with `probe_train` (labeled training data, not `data`):
                                   ``linear_probe`` trained on its z, tested on `data` (Table 3)
      tsne.png                     with `tsne`: ``plot_tsne`` of the labeled samples of `data` (Fig. 7)
      examples.json, examples.png  with `examples` N: ``pick_examples``, N per kind, and their image grid (Figs. 9,
                                   16-19)

    Returns a summary: {run, data, data_fingerprint, out_dir, files, num_samples,
    num_unlabeled_ignored, alpha, beta, alpha_beta_source, top1, the four outcomes, agreement,
    error_reduction, effective_rank, components_90, components_99, head_spectra, probe (or None)}.
    """
    run_dir = Path(run_dir)
    check_number("--batch-size", batch_size, low=1, integer=True)
    check_number("--workers", workers, low=0, integer=True)
    if examples is not None:
        check_number("--examples", examples, low=1, integer=True)
    if tsne:
        _require_sklearn()  # before minutes of inference, not after
    student, meta = load_run(run_dir, device)
    device = resolve_device(device)
    ds, columns = open_labeled(data, meta["classnames"], "--data")
    classnames = ds.classnames  # the run's, or the subset of them that `data` holds (its logits restricted to them)
    train = None
    if probe_train is not None:
        train, _ = open_labeled(probe_train, meta["classnames"], "--probe-train")
        if train.classnames != classnames:
            raise ConfigError(f"--probe-train {train.root} has other classes than --data {ds.root} ({train.num_classes} vs "
                              f"{ds.num_classes}); the probe is trained on one label set and tested on the same")
        if train.fingerprint == ds.fingerprint:
            raise ConfigError(f"--probe-train {train.root} is the same data as --data {ds.root} (fingerprint "
                              f"{ds.fingerprint[:12]}); train the probe on the labeled training split, test on --data")
    stored = read_alpha_beta(run_dir)
    if stored is not None and stored.get("search_on_fingerprint") == ds.fingerprint:
        raise ConfigError(f"{run_dir / ALPHA_BETA} was searched on {ds.root} itself; never tune on the analysed "
                          "data: re-run `dho evaluate --search-on` a validation split first")
    alpha, beta, source = run_alpha_beta(run_dir, meta)
    out_dir = RunDir(run_dir).analysis(ds.root.name) if out_dir is None else Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file; give a folder for the analysis")
    where = {"run": str(run_dir), "data": str(ds.root), "data_fingerprint": ds.fingerprint}

    ce, kd, labels, z = collect_logits(student, ds, batch_size, device, workers, features=True)
    ce, kd = restrict(ce, kd, columns)  # (N, C_data): a subset of the run's classes is analysed on its classes
    keep = labels >= 0  # (N,)
    heads = {**where, "alpha_beta_source": source, "num_unlabeled_ignored": int((~keep).sum()),
             **head_agreement(ce[keep], kd[keep], labels[keep], alpha, beta, classnames=classnames)}
    spectrum = {**where, **feature_spectrum(z), "head_spectra": head_spectra(student)}
    files = [write_json(out_dir / "heads.json", heads),
             plot_heads(heads, out_dir / "heads.png", title=f"{run_dir.name} on {ds.root.name}"),
             write_json(out_dir / "spectrum.json", spectrum),
             plot_spectrum(spectrum, out_dir / "spectrum.png", heads=spectrum["head_spectra"],
                           title=f"{run_dir.name} on {ds.root.name}")]
    probe = None
    if train is not None:
        _, _, train_labels, train_z = collect_logits(student, train, batch_size, device, workers, features=True)
        labeled = train_labels >= 0
        probe = {**where, "probe_train": str(train.root), "probe_train_fingerprint": train.fingerprint,
                 **linear_probe(train_z[labeled], train_labels[labeled], z[keep], labels[keep], device=device,
                                num_classes=len(classnames))}
        files.append(write_json(out_dir / "probe.json", probe))
    picked = None
    if examples is not None:
        rows = torch.nonzero(keep)[:, 0]  # (M,): the labeled rows, which pick_examples' rows index
        picked = pick_examples(ce[keep], kd[keep], labels[keep], alpha, beta, examples)
        for kind in picked.values():
            for e in kind:
                e["row"] = int(rows[e["row"]])
                e["key"] = ds.keys[e["row"]]
        record = {**where, "alpha": alpha, "beta": beta, "classnames": list(classnames), **picked}
        files.append(write_json(out_dir / "examples.json", record))
        if any(picked.values()):
            images = example_images(ds, [e["row"] for kind in picked.values() for e in kind])
            files.append(plot_examples(picked, images, out_dir / "examples.png", classnames, ds.keys,
                                       title=f"{run_dir.name} on {ds.root.name}: one head right, the other wrong"))
    if tsne:
        files.append(plot_tsne(z[keep], labels[keep], out_dir / "tsne.png", classnames=classnames,
                               title=f"t-SNE of z: {run_dir.name} on {ds.root.name}"))
    return {
        **where,
        "out_dir": str(out_dir),
        "files": [p.name for p in files],
        "num_samples": heads["num_samples"],
        "num_unlabeled_ignored": heads["num_unlabeled_ignored"],
        "alpha": alpha,
        "beta": beta,
        "alpha_beta_source": source,
        "top1": heads["top1"],
        **{name: heads[name] for name in CATEGORIES},
        "agreement": heads["agreement"],
        "error_reduction": heads["error_reduction"],
        "effective_rank": spectrum["effective_rank"],
        "components_90": spectrum["components_90"],
        "components_99": spectrum["components_99"],
        "dim": spectrum["dim"],
        "head_spectra": spectrum["head_spectra"],
        "probe": None if probe is None else {k: probe[k] for k in ("top1", "top5", "train_top1", "num_train", "num_test")},
        "examples": None if picked is None else {kind: len(v) for kind, v in picked.items()},
    }


def format_summary(result: dict) -> str:
    """The text `dho analyze` prints for an ``analyze`` result."""
    top1, er, hs = result["top1"], result["error_reduction"], result["head_spectra"]
    lines = [
        f"run {result['run']}  data {result['data']} ({result['num_samples']} labeled samples"
        + (f", {result['num_unlabeled_ignored']} unlabeled left out" if result["num_unlabeled_ignored"] else "") + ")",
        f"alpha = {result['alpha']:g}, beta = {result['beta']:g}  ({result['alpha_beta_source']})",
        f"top-1: ce_head {top1['ce_head']:.2f}  kd_head {top1['kd_head']:.2f}  combined {top1['combined']:.2f}",
        f"heads: both correct {result['both_correct']:.1f}%  only ce_head {result['ce_only']:.1f}%  "
        f"only kd_head {result['kd_only']:.1f}%  both wrong {result['both_wrong']:.1f}%  (argmax equal {result['agreement']:.1f}%)",
        f"error reduction: kd_head fails {er['kd_head']['failed']:.1f}% -> combined {er['kd_head']['still_failed']:.1f}%; "
        f"ce_head fails {er['ce_head']['failed']:.1f}% -> combined {er['ce_head']['still_failed']:.1f}%",
        f"features: effective rank {result['effective_rank']:.1f} of {result['dim']}, "
        f"{result['components_90']} / {result['components_99']} components for 90 / 99% of the variance",
        f"dominant eigenvalue: W_CE W_CE^T {hs['ce_head']:.4g}  W_KD W_KD^T {hs['kd_head']:.4g}  W_CE W_KD^T {_eig(hs['ce_kd'], '.4g')}",
    ]
    if result["probe"] is not None:
        p = result["probe"]
        lines.append(f"linear probe ({p['num_train']} train samples): top-1 {p['top1']:.2f}  top-5 {p['top5']:.2f}  "
                     f"(train top-1 {p['train_top1']:.2f})")
    if result.get("examples") is not None:
        n = result["examples"]
        lines.append(f"examples: {n['ce_only']} where only ce_head is right, {n['kd_only']} where only kd_head is right"
                     + ("" if any(n.values()) else " (no image grid: the heads never disagree that way)"))
    lines.append(f"wrote {', '.join(result['files'])} -> {result['out_dir']}")
    return "\n".join(lines)
