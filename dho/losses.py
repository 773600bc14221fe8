"""Training objectives of DHO and its single-head baselines, as small pure functions.

Every function takes logits / probabilities and returns tensors; the combined objectives
return a dict of named terms (``loss`` is the one to backpropagate, the others are for
logging). All arithmetic is done in float32, whatever the autocast dtype of the logits.

Conventions (paper §3, Alg. 1):
- ``teacher_probs`` come from the teacher cache: the teacher softmax at temperature
  ``zeta * eta`` (Eq. 1 with the extra KD temperature of Alg. 1 lines 13/19).
- KD compares them with ``softmax(student_logits / eta)`` and multiplies the KL by
  ``eta**2`` (Hinton et al., 2015, and the reference code): the gradient of the KL w.r.t.
  the logits scales as 1/eta, so without the factor the KD term would be eta times
  weaker than the CE term it is balanced against with ``lambda_``.
- ``ZETA`` and ``ETA`` below are the paper's two temperatures, the defaults of every
  command and builder that takes them.

The two dual-head KD baselines of the paper's §4.1-4.2 (Table 1's text): ``sskd_loss`` (He et al. 2021)
and ``dhkd_loss`` with ``binary_kl_norm`` (Yang et al. 2024d); both predict with the ce_head only.

Out of scope: sparse (top-k) teacher targets (the training loop densifies them on the device,
``cache.densify_topk``, before they reach these functions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dho.names import ETA, ZETA  # noqa: F401  ζ (Eq. 1, 10) and η (Alg. 1): this module's API, defined torch-free


def ce_loss(ce_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of softmax(ce_logits) against the labels (Eq. 2 / Eq. 6)."""
    return F.cross_entropy(ce_logits.float(), labels)


def kd_loss(kd_logits: Tensor, teacher_probs: Tensor, eta: float) -> Tensor:
    """eta**2 * mean_b KL(p_teacher || softmax(kd_logits / eta)) (Eq. 3 / Eq. 7).

    The direction is KL(p || q): the teacher distribution p weights the log-ratio, so
    classes the teacher gives zero mass contribute nothing (0 * log 0 = 0, via xlogy).
    """
    p = teacher_probs.float()  # (B, C)
    log_q = F.log_softmax(kd_logits.float() / eta, dim=-1)  # (B, C)
    kl = (torch.special.xlogy(p, p) - p * log_q).sum(dim=-1)  # (B,)
    return kl.mean() * eta**2


def dho_loss(
    ce_logits_l: Tensor,
    kd_logits_l: Tensor,
    labels: Tensor,
    probs_l: Tensor,
    kd_logits_u: Tensor,
    probs_u: Tensor,
    lambda_: float,
    eta: float,
) -> dict[str, Tensor]:
    """Dual-head objective L = lambda * L_CE + (1 - lambda) * L_KD (Eq. 6, 7; Alg. 1 line 23).

    L_CE uses the ce_head logits of the labeled batch only; L_KD uses the kd_head logits of
    the labeled batch and of the unlabeled batch, each averaged over its own batch and summed.
    """
    ce = ce_loss(ce_logits_l, labels)
    kd_labeled = kd_loss(kd_logits_l, probs_l, eta)
    kd_unlabeled = kd_loss(kd_logits_u, probs_u, eta)
    kd = kd_labeled + kd_unlabeled
    loss = lambda_ * ce + (1.0 - lambda_) * kd
    return {"loss": loss, "ce": ce, "kd": kd, "kd_labeled": kd_labeled, "kd_unlabeled": kd_unlabeled}


def sho_loss(
    logits_l: Tensor,
    labels: Tensor,
    probs_l: Tensor,
    logits_u: Tensor,
    probs_u: Tensor,
    lambda_: float,
    eta: float,
) -> dict[str, Tensor]:
    """Single-head CE+KD (logit) baseline: Eq. 2 + Eq. 3 on ONE head, lambda-weighted.

    Same formula as ``dho_loss`` but CE and KD act on the same logits, which is what
    creates the gradient conflict of Eq. 4-5.
    """
    return dho_loss(logits_l, logits_l, labels, probs_l, logits_u, probs_u, lambda_=lambda_, eta=eta)


def ce_only(ce_logits_l: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """CE baseline: supervised training on the labeled set only (Eq. 2)."""
    ce = ce_loss(ce_logits_l, labels)
    return {"loss": ce, "ce": ce}


def kd_only(kd_logits_u: Tensor, probs_u: Tensor, eta: float) -> dict[str, Tensor]:
    """KD (logit) baseline: distillation on the unlabeled set only (second term of Eq. 3)."""
    kd = kd_loss(kd_logits_u, probs_u, eta)
    return {"loss": kd, "kd": kd}


def feature_kd_loss(student_z: Tensor, teacher_emb: Tensor, projection: torch.nn.Module) -> Tensor:
    """Feature distillation (CLIP-KD style): squared error between L2-normalised vectors.

    ``projection`` maps the student feature (B, D_s) to the teacher's embedding size
    (B, D_t). The squared error is summed over the embedding dimension and averaged over
    the batch, i.e. mean_b ||n(P z) - n(e)||^2 = mean_b (2 - 2 cos(P z, e)), in [0, 4].
    This is D_t times the elementwise-mean MSE; summing keeps the term on the scale of
    L_CE whatever D_t is (the paper scales the MSE "to match L_CE", following CLIP-KD).
    """
    s = F.normalize(projection(student_z.float()), dim=-1)  # (B, D_t)
    t = F.normalize(teacher_emb.float(), dim=-1)  # (B, D_t)
    return (s - t).pow(2).sum(dim=-1).mean()


def ce_feature_kd_loss(
    logits_l: Tensor,
    labels: Tensor,
    student_z: Tensor,
    teacher_emb: Tensor,
    projection: torch.nn.Module,
    lambda_: float,
) -> dict[str, Tensor]:
    """CE+KD (feature) baseline: lambda * L_CE + (1 - lambda) * feature KD, one head.

    ``student_z`` / ``teacher_emb`` are whichever samples the caller distills on
    (e.g. the labeled and unlabeled batches concatenated).
    """
    ce = ce_loss(logits_l, labels)
    feature_kd = feature_kd_loss(student_z, teacher_emb, projection)
    loss = lambda_ * ce + (1.0 - lambda_) * feature_kd
    return {"loss": loss, "ce": ce, "feature_kd": feature_kd}


def sskd_loss(
    ce_logits_l: Tensor,
    labels: Tensor,
    probs_l: Tensor,
    kd_logits_u: Tensor,
    probs_u: Tensor,
    lambda_: float,
    eta: float,
) -> dict[str, Tensor]:
    """SSKD (He et al. 2021, "Semi-Supervised Domain Generalizable Person Re-Identification", arXiv:2108.05045; its
    loss as its authors' code computes it, xiaomingzhid/sskd `Distiller.losses`): the main head learns the labels
    AND the teacher's soft labels on the labeled data, an auxiliary head (here the kd_head) the teacher's soft labels
    on the unlabeled data:

        L = lambda * CE(ce_head(x_l), y) + (1 - lambda) * [KD(ce_head(x_l), p_l) + KD(kd_head(x_u), p_u)]

    KD as in Eq. 3 (eta**2 * KL at temperature eta). SSKD weighs its three terms equally: lambda = 0.5 does, up to
    an overall 1/2. Its code tempers the two KLs at 16 and 6 (re-id logits); one eta here (docs/fidelity.md #45).
    """
    ce = ce_loss(ce_logits_l, labels)
    kd_labeled = kd_loss(ce_logits_l, probs_l, eta)  # on the ce_head: SSKD's labeled KL trains the main classifier
    kd_unlabeled = kd_loss(kd_logits_u, probs_u, eta)  # on the auxiliary head
    kd = kd_labeled + kd_unlabeled
    loss = lambda_ * ce + (1.0 - lambda_) * kd
    return {"loss": loss, "ce": ce, "kd": kd, "kd_labeled": kd_labeled, "kd_unlabeled": kd_unlabeled}


def binary_kl_norm(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """BinaryKL-Norm of DHKD (Yang et al. 2024d, "Dual-Head Knowledge Distillation", arXiv:2411.08937), as its
    authors' code computes it (penghui-yang/DHKD distiller_zoo/BinaryKLNorm.py):

        T**2 * mean_b sum_c KL(Bern(1/2) || Bern(sigmoid((z_s[b, c] - z_t[b, c]) / T)))

    a per-class binary KL on the logits before softmax, zero exactly where z_s = z_t. The binary KL to 1/2 is
    log cosh(u / 2) of u = (z_s - z_t) / T, computed so (|x| + log1p(exp(-2|x|)) - log 2): finite for any gap, where
    the authors' clamp of the sigmoid to 1 - 1e-8 rounds to 1 in float32 and gives inf for gaps past ~17 T
    (docs/fidelity.md #46). It is NOT invariant to a per-sample shift of the teacher's logits, so log-probabilities
    would not do: it needs the teacher's logits.
    """
    x = ((student_logits.float() - teacher_logits.float()) / (2.0 * temperature)).abs()  # (B, C)
    log_cosh = x + torch.log1p(torch.exp(-2.0 * x)) - math.log(2.0)  # (B, C) = KL(Bern(1/2) || Bern(sigmoid(2x)))
    return log_cosh.sum(dim=-1).mean() * temperature**2


def dhkd_loss(
    ce_logits_l: Tensor,
    labels: Tensor,
    kd_logits_l: Tensor,
    teacher_logits_l: Tensor,
    kd_logits_u: Tensor,
    teacher_logits_u: Tensor,
    lambda_: float,
    eta: float,
) -> dict[str, Tensor]:
    """DHKD (Yang et al. 2024d) in DHO's semi-supervised frame: CE on the ce_head (the labeled batch), BinaryKL-Norm
    at temperature eta on the auxiliary kd_head (labeled + unlabeled batches, each averaged and summed as Eq. 7):

        L = lambda * CE(ce_head(x_l), y) + (1 - lambda) * [BKLN(kd_head(x_l), z_t,l) + BKLN(kd_head(x_u), z_t,u)]

    ``teacher_logits_*`` (B, C) are the teacher's logits f_X(x) . w_c / zeta (Eq. 1 before the softmax).
    """
    ce = ce_loss(ce_logits_l, labels)
    kd_labeled = binary_kl_norm(kd_logits_l, teacher_logits_l, eta)
    kd_unlabeled = binary_kl_norm(kd_logits_u, teacher_logits_u, eta)
    kd = kd_labeled + kd_unlabeled
    loss = lambda_ * ce + (1.0 - lambda_) * kd
    return {"loss": loss, "ce": ce, "kd": kd, "kd_labeled": kd_labeled, "kd_unlabeled": kd_unlabeled}


def prediction_conflict(ce_logits: Tensor, kd_logits: Tensor, labels: Tensor, teacher_probs: Tensor, eta: float) -> Tensor:
    """(p_hat_CE - y)^T (p_hat_KD - p) per labeled sample (B,): the prediction-level conflict of Eqs. 4-5
    (single head: ce_logits is kd_logits) and Eqs. 8-9 (dual head); negative = the two losses pull the
    logits apart. p_hat_CE = softmax(ce_logits), p_hat_KD = softmax(kd_logits / eta) against the teacher
    at temperature eta, so these are the logit gradients of L_CE and of L_KD / eta (Eqs. 2-3)."""
    y = F.one_hot(labels, ce_logits.shape[-1]).float()  # (B, C)
    g_ce = torch.softmax(ce_logits.float(), dim=-1) - y  # (B, C) = dL_CE/dz_logits per sample
    g_kd = torch.softmax(kd_logits.float() / eta, dim=-1) - teacher_probs.float()  # (B, C)
    return (g_ce * g_kd).sum(dim=-1)


# ---------------------------------------------------------------------------------------------- PromptSRC
# Khattak et al. 2023, "Self-regulating Prompts: Foundational Model Adaptation without Forgetting" (ICCV), §3.2, as its
# authors' trainer computes it (muzairkhattak/PromptSRC trainers/promptsrc.py, `forward_backward`, `get_gauss`).
# Table 13's PromptSRC rows: the ce_head is PromptSRC's prompted text classifier, trained with these terms.

PROMPTSRC_TEXT_WEIGHT = 25.0  # lambda_1 of L_SCL-text (its configs' TEXT_LOSS_WEIGHT)
PROMPTSRC_IMAGE_WEIGHT = 10.0  # lambda_2 of L_SCL-image (IMAGE_LOSS_WEIGHT)
GPA_MEAN, GPA_STD, GPA_EPOCHS = 6.0, 10.0, 20  # GPA's Gaussian over its 20 epochs (GPA_MEAN, GPA_STD, MAX_EPOCH)


def scl_feature_loss(features: Tensor, frozen: Tensor) -> Tensor:
    """L_SCL-image / L_SCL-text of PromptSRC (§3.2.1, mutual agreement with the frozen model): the L1 distance of the
    prompted features to the frozen CLIP's, both L2-normalised, averaged over every element (its code's
    ``F.l1_loss(..., reduction='mean')``): mean_{i,d} |n(f_p)[i, d] - n(f)[i, d]| for (N, D) features."""
    return F.l1_loss(F.normalize(features.float(), dim=-1), F.normalize(frozen.float(), dim=-1), reduction="mean")


def scl_logit_loss(logits: Tensor, frozen_logits: Tensor) -> Tensor:
    """L_SCL-logits of PromptSRC (§3.2.1): KL(softmax(frozen zero-shot logits) || softmax(prompted logits)) at
    temperature 1, summed over batch and classes and divided by B * C (its code: ``F.kl_div(log_softmax(logits),
    log_softmax(zero_shot_logits), reduction='sum', log_target=True) / logits.numel()``), i.e. the per-sample KL
    divided by the number of classes."""
    log_q = F.log_softmax(logits.float(), dim=-1)  # (B, C) prompted
    log_p = F.log_softmax(frozen_logits.float(), dim=-1)  # (B, C) frozen CLIP's zero-shot
    return (log_p.exp() * (log_p - log_q)).sum() / logits.numel()


def promptsrc_regularizer(text: Tensor, frozen_text: Tensor, image: Tensor, frozen_image: Tensor, logits: Tensor,
                          frozen_logits: Tensor, text_weight: float = PROMPTSRC_TEXT_WEIGHT,
                          image_weight: float = PROMPTSRC_IMAGE_WEIGHT) -> dict[str, Tensor]:
    """L_SCL = lambda_1 L_SCL-text + lambda_2 L_SCL-image + L_SCL-logits (PromptSRC §3.2.1; the full objective is
    L_CE + L_SCL). text / frozen_text: (C, D) class text features of the prompted and the frozen text tower (the
    latter the mean over PromptSRC's 60 ImageNet templates); image / frozen_image: (B, D) image features; logits /
    frozen_logits: (B, C) -> {"scl": L_SCL, "scl_text", "scl_image", "scl_logits"} (each unweighted but L_SCL)."""
    scl_text = scl_feature_loss(text, frozen_text)
    scl_image = scl_feature_loss(image, frozen_image)
    scl_logits = scl_logit_loss(logits, frozen_logits)
    scl = text_weight * scl_text + image_weight * scl_image + scl_logits
    return {"scl": scl, "scl_text": scl_text, "scl_image": scl_image, "scl_logits": scl_logits}


def gpa_weights(epochs: int, mean: float = GPA_MEAN, std: float = GPA_STD, span: int = GPA_EPOCHS) -> list[float]:
    """Gaussian prompt aggregation's epoch weights (PromptSRC §3.2.2): w_e proportional to the N(mean, std^2) density
    at epoch e = 1 .. epochs, normalised to sum 1; the prompts of the model are sum_e w_e P_e, P_e those at the end of
    epoch e. PromptSRC's Gaussian is over its 20 epochs (`span`); a run of another length evaluates it at e * span /
    epochs (the same place in the schedule; exactly PromptSRC's at epochs = span)."""
    x = [e * span / epochs for e in range(1, epochs + 1)]
    density = [math.exp(-0.5 * ((v - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for v in x]
    total = sum(density)
    return [d / total for d in density]
