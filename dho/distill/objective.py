"""The training methods of `dho distill --method`: one plain record each, the only place that knows a method.

    method         reads                trains     loss (dho.losses)                        predicts with (Eq. 11)
    dho            labeled + unlabeled  both heads dho_loss: CE on ce_head, KD on kd_head   the run's alpha, beta
                                                   (Eq. 6-7)
    ce             labeled              ce_head    ce_only (Eq. 2)                          ce_head (alpha 1)
    kd             unlabeled            kd_head    kd_only (the unlabeled term of Eq. 3)    kd_head (alpha 0, beta 1)
    ce+kd          labeled + unlabeled  ce_head    sho_loss: Eq. 2-3 on one head (SHO)      ce_head
    ce+kd-feature  labeled + unlabeled  ce_head    ce_feature_kd_loss: CE + MSE of the       ce_head
                                                   projected feature to the teacher's image embedding (CLIP-KD)
    sskd           labeled + unlabeled  both heads sskd_loss: CE + KD on ce_head (labeled),      ce_head
                                                   KD on kd_head (unlabeled) (He et al. 2021)
    dhkd           labeled + unlabeled  both heads dhkd_loss: CE on ce_head, BinaryKL-Norm on    ce_head
                                                   kd_head against the teacher's logits (Yang et al. 2024d)

SSKD's and DHKD's auxiliary head is the student's kd_head (built, saved in model.pt and initialised as for dho);
like the paper (§4.1) they predict with the ce_head only. DHKD's loss needs the teacher's logits before the
softmax, which the cache does not hold: they are rebuilt as (cached image embedding) . (cached text classifier)
/ zeta of the teacher, so dhkd needs caches made with `--store-embeddings` (docs/fidelity.md #46).

The loop asks the record what to read, train, optimise, log and keep; it never branches on a method's
name. A new method is one record here and one pure function in dho/losses.py (plus its name in the
`--method` help of dho/cli.py, which a test keeps equal to METHODS).

A method with two loss terms names them (`tasks`: lambda * L_CE and (1 - lambda) * L_KD), which
`--grad-surgery pcgrad` projects apart (dho/distill/surgery.py).

The backbone g trains unless `--freeze-backbone` (linear evaluation / prompt tuning, Table 13) freezes it for any
method (then only the method's heads and the VPT prompts train). An epoch is one pass over the unlabeled stream for every method (ce too),
so baselines take the same number of steps.

With a PromptSRC ce_head (`--promptsrc-tokens`), `Objective.terms` adds PromptSRC's L_SCL on the labeled batch at the
weight the method gives its CE term (`ce_share`: 1 for ce, lambda for dho; the other methods refuse it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn as nn

from dho import losses

if TYPE_CHECKING:
    from dho.stream import Batch

Outputs = Optional[dict]  # the student's forward of one half: ce_logits (b, C), kd_logits (b, C), z (b, D); None if not read


@dataclass(frozen=True)
class Objective:
    """What one method reads, trains and optimises, and how its model predicts."""

    name: str
    reads_labeled: bool
    reads_unlabeled: bool
    trains: tuple[str, ...]  # the heads that get gradients ("ce_head", "kd_head"); the other one stays as initialised
    # (out_l, out_u, batch, model, lambda_, eta) -> {"loss": ..., named terms} (dho.losses)
    loss: Callable[[Outputs, Outputs, "Batch", "Trainee", float, float], dict]
    alpha_beta: Optional[tuple[float, float]] = None  # its model's fixed Eq. 11 mix; None: the run's --alpha/--beta,
    #                                                   searched on --val with --select-best-on-val
    diagnostics_head: Optional[str] = None  # the head whose KD gradient --log-grad-cosine compares with CE's; None: none
    feature_kd: bool = False  # reads the teacher's image embeddings and trains a projection to them
    teacher_logits: bool = False  # reads the teacher's image embeddings and rebuilds its logits from them (Trainee)
    # (terms, lambda_) -> the loss's two weighted terms, summing to terms["loss"]: what --grad-surgery projects
    # apart (dho/distill/surgery.py); None: one term, nothing to project (names.SURGERY_METHODS lists the others)
    tasks: Optional[Callable[[dict, float], tuple[torch.Tensor, torch.Tensor]]] = None
    # lambda_ -> the weight its loss gives the ce_head's CE term: where PromptSRC's L_SCL joins it (the ce_head's
    # objective L_CE + L_SCL keeps PromptSRC's balance); None: a method --promptsrc-tokens does not combine with
    ce_share: Optional[Callable[[float], float]] = None

    @property
    def reads_embeddings(self) -> bool:
        """Whether its batches carry the teacher's image embeddings (the caches need --store-embeddings)."""
        return self.feature_kd or self.teacher_logits

    def terms(self, out_l: Outputs, out_u: Outputs, batch: "Batch", model: "Trainee", lambda_: float, eta: float) -> dict:
        """The step's loss terms: the method's, and with a PromptSRC ce_head its L_SCL on the labeled batch
        (dho.losses.promptsrc_regularizer) added at the CE term's weight: loss + ce_share(lambda) * L_SCL."""
        terms = self.loss(out_l, out_u, batch, model, lambda_, eta)
        if not model.promptsrc:
            return terms
        head = model.student.ce_head
        reg = losses.promptsrc_regularizer(out_l["text_features"], head.frozen_text, out_l["z"], out_l["frozen_z"],
                                           out_l["ce_logits"], head.frozen_logits(out_l["frozen_z"]))
        return {**terms, **reg, "loss": terms["loss"] + self.ce_share(lambda_) * reg["scl"]}

    def samples_per_step(self, batch_size: int) -> int:
        """Samples one step reads (B labeled and/or B unlabeled)."""
        return batch_size * (int(self.reads_labeled) + int(self.reads_unlabeled))


def _dho(out_l, out_u, batch, model, lambda_, eta):
    return losses.dho_loss(out_l["ce_logits"], out_l["kd_logits"], batch.l.label, batch.l.probs,
                           out_u["kd_logits"], batch.u.probs, lambda_=lambda_, eta=eta)


def _ce(out_l, out_u, batch, model, lambda_, eta):
    return losses.ce_only(out_l["ce_logits"], batch.l.label)


def _kd(out_l, out_u, batch, model, lambda_, eta):
    return losses.kd_only(out_u["kd_logits"], batch.u.probs, eta=eta)


def _sho(out_l, out_u, batch, model, lambda_, eta):
    return losses.sho_loss(out_l["ce_logits"], batch.l.label, batch.l.probs, out_u["ce_logits"], batch.u.probs,
                           lambda_=lambda_, eta=eta)


def _feature(out_l, out_u, batch, model, lambda_, eta):
    z = torch.cat([out_l["z"], out_u["z"]])  # (B_l + B_u, D)
    emb = torch.cat([batch.l.emb, batch.u.emb])  # (B_l + B_u, D_teacher)
    return losses.ce_feature_kd_loss(out_l["ce_logits"], batch.l.label, z, emb, model.projection, lambda_=lambda_)


def _sskd(out_l, out_u, batch, model, lambda_, eta):
    return losses.sskd_loss(out_l["ce_logits"], batch.l.label, batch.l.probs, out_u["kd_logits"], batch.u.probs,
                            lambda_=lambda_, eta=eta)


def _dhkd(out_l, out_u, batch, model, lambda_, eta):
    return losses.dhkd_loss(out_l["ce_logits"], batch.l.label, out_l["kd_logits"], model.teacher_logits(batch.l.emb),
                            out_u["kd_logits"], model.teacher_logits(batch.u.emb), lambda_=lambda_, eta=eta)


def _ce_and_kd(terms, lambda_):
    return lambda_ * terms["ce"], (1.0 - lambda_) * terms["kd"]


def _ce_and_feature_kd(terms, lambda_):
    return lambda_ * terms["ce"], (1.0 - lambda_) * terms["feature_kd"]


SINGLE_HEAD = (1.0, 1.0)  # single-head methods predict with the head they trained: alpha = 1 -> ce_head
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("dho", True, True, ("ce_head", "kd_head"), _dho, diagnostics_head="kd_head", tasks=_ce_and_kd,
              ce_share=lambda lambda_: lambda_),
    Objective("ce", True, False, ("ce_head",), _ce, alpha_beta=SINGLE_HEAD, ce_share=lambda lambda_: 1.0),
    Objective("kd", False, True, ("kd_head",), _kd, alpha_beta=(0.0, 1.0)),  # alpha = 0, beta = 1 -> kd_head
    Objective("ce+kd", True, True, ("ce_head",), _sho, alpha_beta=SINGLE_HEAD, diagnostics_head="ce_head",
              tasks=_ce_and_kd),
    Objective("ce+kd-feature", True, True, ("ce_head",), _feature, alpha_beta=SINGLE_HEAD, feature_kd=True,
              tasks=_ce_and_feature_kd),
    Objective("sskd", True, True, ("ce_head", "kd_head"), _sskd, alpha_beta=SINGLE_HEAD, tasks=_ce_and_kd),
    Objective("dhkd", True, True, ("ce_head", "kd_head"), _dhkd, alpha_beta=SINGLE_HEAD, teacher_logits=True,
              tasks=_ce_and_kd),
)}
METHODS = tuple(OBJECTIVES)
PROMPTSRC_METHODS = tuple(name for name, o in OBJECTIVES.items() if o.ce_share is not None)  # --promptsrc-tokens' methods


class Trainee(nn.Module):
    """The student plus training-only parts (the feature-KD projection, the teacher's logit weights); only `student`
    is exported."""

    def __init__(self, student: nn.Module, projection: Optional[nn.Module], teacher_logit_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.student = student
        self.projection = projection
        # (C, D) the teacher's text classifier / its zeta, from the cache: not trained, not checkpointed (rebuilt)
        self.register_buffer("teacher_logit_weight", teacher_logit_weight, persistent=False)
        from dho.students import PromptSrcHead

        # PromptSRC: the labeled half's outputs also carry the class text features of the step and the frozen tower's
        # image features (its L_SCL; `Objective.terms`)
        self.promptsrc = isinstance(getattr(student, "ce_head", None), PromptSrcHead)

    def teacher_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """The teacher's logits f_X(x) . w_c / zeta (Eq. 1 before the softmax) from its cached image embeddings (b, D)
        -> (b, C) float32, as dho.teacher.Teacher.logits computes them (outside autocast: a bf16 matmul would move
        a logit of ~30 by ~0.1)."""
        with torch.autocast(emb.device.type, enabled=False):
            return emb.float() @ self.teacher_logit_weight.float().T

    def forward(self, l_image: Optional[torch.Tensor], u_image: Optional[torch.Tensor], separate: bool = False):
        """-> (outputs of the labeled half, of the unlabeled half); either may be None. Joint: one forward over
        [labeled; unlabeled], so both share the BatchNorm statistics; separate: two (the ten-dataset reference).
        PromptSRC in training: the labeled half's also holds text_features (C, D) and frozen_z (b, D)."""
        out_l, out_u = self._halves(l_image, u_image, separate)
        if self.promptsrc and self.training and out_l is not None:
            with torch.no_grad():  # the frozen CLIP's image features: the tower without its prompts
                frozen_z = self.student.backbone.zero_shot(l_image)
            out_l = {**out_l, "text_features": self.student.ce_head.text_features, "frozen_z": frozen_z}
        return out_l, out_u

    def _halves(self, l_image: Optional[torch.Tensor], u_image: Optional[torch.Tensor], separate: bool):
        if l_image is None or u_image is None:
            return (self.student(l_image) if l_image is not None else None,
                    self.student(u_image) if u_image is not None else None)
        if separate:
            return self.student(l_image), self.student(u_image)
        n_l = l_image.shape[0]
        both = self.student(torch.cat([l_image, u_image]))  # (B_l + B_u, ...)
        return {k: v[:n_l] for k, v in both.items()}, {k: v[n_l:] for k, v in both.items()}


def build_trainee(objective: Objective, student: nn.Module, embed_dim: int,
                  teacher_logit_weight: Optional[torch.Tensor] = None, freeze_backbone: bool = False) -> Trainee:
    """The student with the heads the method does not train frozen (and with `freeze_backbone` g too, its prompts
    aside: `DualHeadStudent.freeze_backbone`), the method's projection (drawn from the global RNG after the student,
    as the run's seed fixes it) and, for a method on the teacher's logits, its (C, D) weights."""
    if objective.teacher_logits and teacher_logit_weight is None:
        raise ValueError(f"--method {objective.name} needs the teacher's logit weights (text classifier / zeta)")
    if freeze_backbone:
        student.freeze_backbone()
    projection = nn.Linear(student.feature_dim, embed_dim) if objective.feature_kd else None
    for head in ("ce_head", "kd_head"):
        if head not in objective.trains:
            getattr(student, head).requires_grad_(False)
    return Trainee(student, projection, teacher_logit_weight if objective.teacher_logits else None)
