"""The gradient-conflict diagnostics of Figs. 4 and 13 (`dho distill --log-grad-cosine N`): computed on a
training batch every N steps, logged to metrics.jsonl and the checkpoint, plotted as RUN/grad_cosine.png.

For methods with `Objective.diagnostics_head` (dho: kd_head next to ce_head; ce+kd: the one head for
both losses, so p_hat_CE = p_hat_KD):

    grad_cosine          cos(∇θ L_CE, ∇θ L_KD) over the feature extractor g's parameters (Fig. 4)
    grad_cosine_z        cos(∇z L_CE, ∇z L_KD) per labeled sample, averaged (Eq. 5, Fig. 13 right)
    pred_inner           (p_hat_CE - y)^T (p_hat_KD - p) per labeled sample, averaged (Eqs. 4-5 / 8-9, Fig. 4's x)
    pred_inner_negative  the share of labeled samples where it is < 0
    eig_ce, eig_kd, eig_ce_kd   dominant eigenvalues of W_CE W_CE^T, W_KD W_KD^T, W_CE W_KD^T (Fig. 13 left;
                         single head: eig_ce only; with an mlp head no eig_ce_kd: its W acts on its own
                         hidden h, not on the other head's input, so the product has no meaning)

L_KD is the training loss's: eta^2 KL on the labeled and on the unlabeled half.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dho import losses
from dho.atomic import write_atomic
from dho.distill.objective import Objective, Trainee

GRAD_PANELS = (  # (key, y label, title): the panels of grad_cosine.png
    ("grad_cosine", "cos(∇θ L_CE, ∇θ L_KD)", "parameters of g (Fig. 4)"),
    ("pred_inner", "(p̂_CE − y)ᵀ(p̂_KD − p)", "prediction level (Eqs. 4–5, 8–9)"),
    ("grad_cosine_z", "cos(∇z L_CE, ∇z L_KD)", "features z (Eq. 5, Fig. 13 right)"),
    ("eig", "dominant eigenvalue", "W Wᵀ (Fig. 13 left)"),
)


def grad_diagnostics(model: Trainee, batch, objective: Objective, eta: float, autocast) -> dict:
    """The quantities of the module docstring on one batch (`dho.stream.Batch` on the device)."""
    from dho.students import MLPHead, dominant_eigenvalue, head_weight

    student = model.student
    params = [p for p in student.backbone.parameters() if p.requires_grad]
    kd_head = getattr(student, objective.diagnostics_head)
    with autocast():
        z_l = student.features(batch.l.image)  # (B_l, D)
        z_u = student.features(batch.u.image)  # (B_u, D)
        ce_logits = student.ce_head(z_l)  # (B_l, C)
        kd_logits = kd_head(z_l)  # (B_l, C)
        ce = losses.ce_loss(ce_logits, batch.l.label)
        kd = losses.kd_loss(kd_logits, batch.l.probs, eta=eta) + losses.kd_loss(kd_head(z_u), batch.u.probs, eta=eta)
    *g_ce, gz_ce = torch.autograd.grad(ce, params + [z_l], retain_graph=True, allow_unused=True)
    *g_kd, gz_kd = torch.autograd.grad(kd, params + [z_l], allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float() for g, p in zip(gs, params)])  # noqa: E731
    inner = losses.prediction_conflict(ce_logits.detach(), kd_logits.detach(), batch.l.label, batch.l.probs, eta)  # (B_l,)
    w_ce = head_weight(student.ce_head)
    out = {
        "grad_cosine": float(F.cosine_similarity(flat(g_ce), flat(g_kd), dim=0)),
        "grad_cosine_z": float(F.cosine_similarity(gz_ce.float(), gz_kd.float(), dim=-1).mean()),
        "pred_inner": float(inner.mean()),
        "pred_inner_negative": float((inner < 0).float().mean()),
        "eig_ce": dominant_eigenvalue(w_ce),
    }
    if kd_head is not student.ce_head:  # two heads: their own spectrum and the cross term
        w_kd = head_weight(kd_head)
        out["eig_kd"] = dominant_eigenvalue(w_kd)
        if not any(isinstance(h, MLPHead) for h in (student.ce_head, kd_head)):
            out["eig_ce_kd"] = dominant_eigenvalue(w_ce, w_kd)
    return out


EIG_KEYS = ("eig_ce", "eig_kd", "eig_ce_kd")


def _linthresh(series: dict[str, list[dict]]) -> float:
    """The linear range of the eigenvalue panel's symlog axis: the smallest |eigenvalue| drawn (at most 1e-4 of the
    largest), so every point lies in the logarithmic part and zero and negative values still have a place."""
    values = [abs(r[k]) for records in series.values() for r in records for k in EIG_KEYS if r.get(k)]
    return max(min(values), max(values) * 1e-4) if values else 1.0


def plot_grad_diagnostics(series: dict[str, list[dict]], path: Path) -> Path:
    """`grad_diagnostics_figure(series)` as a PNG."""
    import matplotlib.pyplot as plt

    fig = grad_diagnostics_figure(series)
    path = write_atomic(Path(path), lambda part: fig.savefig(part, dpi=110, format="png"))
    plt.close(fig)
    return path


def grad_diagnostics_figure(series: dict[str, list[dict]]):
    """The gradient-conflict diagnostics over training, one line per run (e.g. {"dho": ..., "ce+kd": ...}):
    θ-cosine, prediction-level inner product, z-cosine and the dominant eigenvalues of W Wᵀ. The eigenvalues
    are on a symmetric-log axis: W_CE W_KDᵀ is not symmetric and its dominant eigenvalue can be negative (a log
    axis would drop it); steps are integers on every x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, (key, ylabel, title) in zip(axes, GRAD_PANELS):
        for name, records in series.items():
            if key == "eig":
                two_heads = any("eig_kd" in r for r in records)  # dual head: each matrix named; one head: W Wᵀ
                for k, style, label in (("eig_ce", "-", "W_CE W_CEᵀ"), ("eig_kd", "--", "W_KD W_KDᵀ"), ("eig_ce_kd", ":", "W_CE W_KDᵀ")):
                    pts = [(r["step"], r[k]) for r in records if k in r]
                    if pts:
                        ax.plot(*zip(*pts), style, marker=".", label=f"{name}: {label if two_heads else 'W Wᵀ'}")
                ax.set_yscale("symlog", linthresh=_linthresh(series))
                if any(r.get(k, 0) < 0 for records in series.values() for r in records for k in EIG_KEYS):
                    ax.axhline(0.0, color="gray", lw=0.8)
                continue
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=name)
        if key != "eig":
            ax.axhline(0.0, color="gray", lw=0.8)
        if key.startswith("grad_cosine"):
            ax.set_ylim(-1, 1)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 2.5
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Gradient conflict between L_CE and L_KD during training", fontsize=11)
    fig.tight_layout()
    return fig
