"""Dual-head students: a feature extractor g and two linear heads on z = g(x) (paper §3.2).

    z = g(x)                                   # (B, D)
    ce_logits = ce_head(z) = W_ce z + b_ce     # (B, C), trained with CE only
    kd_logits = kd_head(z)                     # (B, C), trained with KD only
              = W_kd z + b_kd                  # linear (CNN students)
              = (1 / zeta) * (W_kd n(z) + b_kd)  # aligned head of the reference code (VLM students, default)
              = (1 / zeta) * cos(z, w_c)       # aligned head as Eq. 10 states it (vlm_heads="eq10")

Students:
- torchvision CNNs: ``resnet18``, ``resnet50``, ``mobilenet_v2`` and the test variant
  ``resnet-tiny`` (a real torchvision ``ResNet`` with BasicBlocks [1, 1, 1, 1], widths
  16-128). z is the penultimate pooled feature (the classifier is removed; for MobileNetV2
  this also removes its dropout).
- timm models: ``timm/ARCH`` or ``timm/ARCH.TAG`` (any ``timm.list_models()`` name; the tag
  picks the pretrained config, hence the preprocessing, and the weights of ``--student-pretrained
  timm``). g is ``timm.create_model(ARCH, num_classes=0)``: the pooled pre-classifier feature,
  D = ``head_hidden_size`` where timm's head has a pre-logits layer, else ``num_features``. Heads as
  for the torchvision CNNs. Weights: none, timm's (read from the local Hugging Face cache only,
  never downloaded) or a local state_dict / safetensors file in timm's format. Preprocessing comes
  from the model's data config (input size, interpolation, mean, std); dho evaluates with
  open_clip's view (short side to image_size, center crop), i.e. timm's ``crop_pct`` is taken as 1.0
  and only recorded in ``preprocess``. Built by ``dho.timm_students``.
- open_clip image towers: ``clip:NAME`` or a bare open_clip model name (``ViT-B-16``), or a
  path to an open_clip model-config JSON (``clip:path/to/tiny.json``). z is the image
  tower's output embedding after its projection, D = embed_dim. The student's own text
  encoder is used once for language-aware head init (prompts and template means of
  ``dho.templates``, default ``STUDENT_INIT_TEMPLATES``) and then dropped.

Head forms of VLM students (``vlm_heads``; no effect on CNN students):
- ``reference`` (the authors' code, which produced Table 4; n = L2 normalisation): the aligned
  kd_head is a linear layer with bias on n(z), times 1/zeta, so its weight norms and bias train;
  language-aware init sets both heads' weights to the raw per-class mean of the template text
  embeddings (not normalised), biases zero.
- ``eq10`` (the paper's text): the aligned kd_head is (1/zeta) cos(z, w_c), unit-norm rows, no
  bias; language-aware init uses the per-class mean of L2-normalised template embeddings,
  re-normalised (the teacher's classifier of Eq. 1).
``init_heads_from_text`` off: ``nn.init.kaiming_uniform_(W, a=sqrt(5))`` (PyTorch's nn.Linear
default, fan_in) and zero biases, as always for CNN students. ``text_init_heads`` ``ce`` or ``kd``: only
that head starts from the text embeddings, the other as with the init off (Table 5's per-head rows).
``align_kd_head`` off: kd_head is a plain linear head on z. The settings are independent (Table 5 ablation).

Non-linear heads (paper §E.2, Tables 14-15; ``ce_head`` / ``kd_head`` = ``mlp``, every student kind):

    head(z) = out(Dropout(GELU(LayerNorm(W_1 z + b_1))))   # (B, D) -> (B, H) -> (B, C), H = ``head_hidden`` (default D)

``out`` is the layer the linear head would have been, on the hidden h instead of z: nn.Linear, or for the aligned
kd_head of VLM students its reference / Eq. 10 form on n(h). Both linear layers start as the linear heads do
(kaiming_uniform, zero bias), LayerNorm at (1, 0). Language-aware init sets linear heads only: the text embeddings
live in z's space, not in the hidden space an mlp head's last layer reads, so an mlp head starts as with the init
off (docs/fidelity.md); ``text_init_heads`` naming only mlp heads is refused. Model files record the forms,
H and the dropout in ``build_args`` (only when a head is mlp: files of linear heads are as before).

Frozen backbones and visual prompts (§D.2, Table 13): ``DualHeadStudent.freeze_backbone`` (``dho distill
--freeze-backbone``) freezes g and keeps it in eval mode; ``vpt_tokens`` / ``vpt_depth`` wrap an open_clip ViT tower in
``VptTower`` (VPT-deep: learned tokens after the class token at the first D blocks), recorded in ``build_args``.
``coop_context`` N makes ce_head ``CoopHead`` (CoOp: N learned context vectors through the student's frozen text tower
give the class weights; kd_head stays the linear head on z, DHO's distillation pathway); model files hold it as a
fixed ``CosineHead`` with those class weights (``fixed_state``), so no reader needs the text tower.
``promptsrc_tokens`` / ``promptsrc_depth`` are PromptSRC's (IVLP) prompts on both towers: the image tower in ``VptTower``'s
"ivlp" placement, ce_head ``PromptSrcHead`` (CoopHead's context from "a photo of a" plus deeper text prompts, and the frozen
text features of its L_SCL, dho.losses); model files hold it as CoOp's, the image prompts in ``backbone.prompts``.

Model files: ``save_student`` / ``load_student`` hold everything needed to rebuild the
student offline (no download, no text encoder): build args (incl. the open_clip model
config), state_dict, class names, preprocessing, alpha and beta.

Out of scope: MaPLe-style coupled prompts, CoOp's class-specific contexts and other class-token positions,
VPT-shallow/other prompt placements, non-linear heads other than §E.2's, ``hf-hub:`` / ``local-dir:`` sources for open_clip
and timm students, timm's crop_pct in the evaluation view, timm ``features_only`` / feature-map
students.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet

import dho
from dho.atomic import write_atomic
from dho.data.views import Preprocessing
from dho.errors import ConfigError
from dho.losses import ZETA
from dho.names import CNN_STUDENTS, HEAD_DROPOUT, HEAD_FORMS, TEXT_INIT_HEADS, VLM_HEADS, check_student  # noqa: F401  VLM_HEADS: see the module docstring
from dho.templates import STUDENT_INIT_TEMPLATES, fill_templates, resolve_templates, template_mean
from dho.timm_students import TIMM_PREFIX, build_timm, rebuild_timm, strip_prefixes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_FILE_FORMAT = "dho-student"
MODEL_FILE_VERSION = 1
WEIGHTS = ("ema", "raw")  # load_student's weights: the EMA of a --ema run, or the trained weights


# --------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------


class CosineHead(nn.Module):
    """Aligned KD head (Eq. 10): logits_c = (1 / zeta) * cos(z, w_c), no bias, fixed scale."""

    def __init__(self, in_features: int, num_classes: int, zeta: float = ZETA):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))  # (C, D)
        self.zeta = float(zeta)
        _kaiming_init(self.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast: at scale 1/zeta = 100, bf16 logits would be off by up to 0.5
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)  # (B, D)
            w = F.normalize(self.weight.float(), dim=-1)  # (C, D)
            return z @ w.t() / self.zeta  # (B, C)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, num_classes={self.weight.shape[0]}, zeta={self.zeta}"


class NormalizedLinearHead(nn.Linear):
    """Aligned KD head of the reference code: logits = (W n(z) + b) / zeta, weight norms and bias trainable."""

    def __init__(self, in_features: int, num_classes: int, zeta: float = ZETA):
        super().__init__(in_features, num_classes)
        self.zeta = float(zeta)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast, as CosineHead: the 1/zeta scale magnifies rounding
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.linear(F.normalize(z.float(), dim=-1), self.weight.float(), self.bias.float()) / self.zeta  # (B, C)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", zeta={self.zeta}"


class MLPHead(nn.Module):
    """Non-linear head of §E.2: out(Dropout(GELU(LayerNorm(fc(z))))); `out` is the linear head's layer on h (C, H)."""

    def __init__(self, in_features: int, hidden: int, out: nn.Module, dropout: float):
        super().__init__()
        self.fc = nn.Linear(in_features, hidden)  # (H, D)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.out = out

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.norm(self.fc(z))))  # (B, H)
        return self.out(h)  # (B, C)


def _make_head(form: str, linear: Callable[[int], nn.Module], in_features: int, hidden: int, dropout: float) -> nn.Module:
    """`linear(in_features)` (the head's linear layer), or for form "mlp" an MLPHead ending in `linear(hidden)`."""
    return linear(in_features) if form == "linear" else MLPHead(in_features, hidden, linear(hidden), dropout)


def head_input(head: nn.Module) -> str:
    """What the matrix of `head_weight(head)` multiplies: z, n(z) (aligned heads), h(z) or n(h(z)) (mlp heads)."""
    if isinstance(head, MLPHead):
        return head_input(head.out).replace("z", "h(z)")
    return "n(z)" if isinstance(head, (CosineHead, NormalizedLinearHead)) else "z"


def head_weight(head: nn.Module) -> torch.Tensor:
    """The (C, D) matrix W a head applies to its input (float32, detached): a linear head's weight, and
    for the aligned heads the matrix acting on the normalised feature, scale 1/zeta included (Eq. 10:
    unit rows / zeta; the reference's head: W / zeta). The W of the paper's W W^T analysis (Fig. 13).
    An mlp head: the (C, H) matrix of its last layer, on its hidden h (`head_input`)."""
    if isinstance(head, MLPHead):
        return head_weight(head.out)
    w = head.weight.detach().float()  # (C, D)
    if isinstance(head, CosineHead):
        return F.normalize(w, dim=-1) / head.zeta
    if isinstance(head, NormalizedLinearHead):
        return w / head.zeta
    return w


def dominant_eigenvalue(a: torch.Tensor, b: Optional[torch.Tensor] = None) -> float:
    """Dominant eigenvalue of A B^T (C x C) for A, B (C, D), B = A by default (A A^T, symmetric PSD):
    computed on the D x D product B^T A, whose nonzero eigenvalues are the same; for A != B the
    eigenvalue of largest magnitude, real part."""
    a = a.detach().double()
    b = a if b is None else b.detach().double()
    m = b.t() @ a  # (D, D)
    if b is a:
        return float(torch.linalg.eigvalsh(m).max())
    ev = torch.linalg.eigvals(m)  # (D,) complex
    return float(ev[ev.abs().argmax()].real)


def _kaiming_init(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # fan_in; PyTorch's nn.Linear default


class DualHeadStudent(nn.Module):
    """Feature extractor g (``backbone``) with ``ce_head`` and ``kd_head`` on the same z."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        align_kd_head: bool,
        zeta: float,
        preprocess: Preprocessing,
        build_args: dict,
        vlm_heads: str = "eq10",
        ce_head: str = "linear",
        kd_head: str = "linear",
        head_hidden: Optional[int] = None,
        head_dropout: float = HEAD_DROPOUT,
    ):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        hidden = int(head_hidden or feature_dim)  # H of the mlp heads
        if not align_kd_head:
            kd_linear = lambda d: nn.Linear(d, num_classes)  # noqa: E731
        elif vlm_heads == "reference":
            kd_linear = lambda d: NormalizedLinearHead(d, num_classes, zeta)  # noqa: E731
        else:
            kd_linear = lambda d: CosineHead(d, num_classes, zeta)  # noqa: E731
        self.ce_head = _make_head(ce_head, lambda d: nn.Linear(d, num_classes), feature_dim, hidden, head_dropout)
        self.kd_head = _make_head(kd_head, kd_linear, feature_dim, hidden, head_dropout)
        for head in (self.ce_head, self.kd_head):
            layers = (head.fc, head.out) if isinstance(head, MLPHead) else (head,)
            for layer in layers:
                _kaiming_init(layer.weight)
                if getattr(layer, "bias", None) is not None:
                    nn.init.zeros_(layer.bias)
        self.preprocess = preprocess  # how it takes its images (the views, the evaluation view, mean/std)
        self.build_args = dict(build_args)
        # convolutional backbones (torchvision, timm) run NHWC (channels_last) on CUDA: tensor cores without transposes
        self.channels_last = build_args.get("kind") in ("torchvision", "timm")
        self.backbone_frozen = False  # `freeze_backbone`: g stays as built and in eval mode

    def freeze_backbone(self) -> "DualHeadStudent":
        """Freeze g (linear evaluation, prompt tuning; Table 13): no parameter of the backbone takes gradients but its
        prompts (`VptTower.prompt_parameters`), and the backbone stays in eval mode whatever `train()` is called:
        BatchNorm normalises with its running statistics and never updates them, Dropout / DropPath / open_clip's
        patch dropout are off; LayerNorm has no state, its affine parameters are frozen with the rest. The heads
        (their dropout included) train as always."""
        self.backbone.requires_grad_(False)
        for p in getattr(self.backbone, "prompt_parameters", list)():
            p.requires_grad_(True)
        self.backbone_frozen = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> "DualHeadStudent":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """z = g(x): (B, 3, S, S) normalised images -> (B, D)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.features(x)  # (B, D)
        return {"ce_logits": self.ce_head(z), "kd_logits": self.kd_head(z), "z": z}  # (B, C), (B, C), (B, D)


# --------------------------------------------------------------------------------------------
# frozen backbones and visual prompts (paper §D.2, Table 13)
# --------------------------------------------------------------------------------------------


VPT_PLACEMENTS = ("vpt", "ivlp")  # VptTower: VPT-deep's (after the class token, after ln_pre), PromptSRC's (IVLP)


def vpt_init_bound(patch_size: tuple[int, int], width: int) -> float:
    """VPT's prompt init bound (Jia et al. 2022, the authors' code): val = sqrt(6 / (3 * patch_h * patch_w + width)),
    a Xavier-uniform bound over a patch's 3 * h * w pixels and the token width; prompts ~ U(-val, val)."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + width))


class VptTower(nn.Module):
    """VPT-deep around an open_clip VisionTransformer: N learned tokens after the class token at the input of each of
    the first D blocks (Jia et al. 2022, Eq. 3-4), those of block i replacing the ones block i - 1 output; blocks D..
    carry the tokens block D - 1 output. The class token is pooled, so the prompts reach z only through attention.

        x_0 = ln_pre([cls; patches] + pos)                        # (B, 1 + P, W), open_clip's _embeds
        x_i = block_i([x_{i-1}[:, :1]; prompts[i]; x_{i-1}[:, 1 + N:]])   for i < D (block 0: no old prompts)
        z   = ln_post(x_L[:, 0]) @ proj                           # (B, D_embed), open_clip's _pool + proj

    ``tower`` keeps open_clip's parameters and keys (``backbone.tower.*``); ``prompts`` is (D, N, W)."""

    def __init__(self, tower: nn.Module, tokens: int, depth: int, placement: str = "vpt"):
        super().__init__()
        if placement not in VPT_PLACEMENTS:
            raise ConfigError(f"prompt placement must be one of {', '.join(VPT_PLACEMENTS)}, got {placement!r}")
        self.tower = tower
        self.tokens, self.depth, self.placement = int(tokens), int(depth), placement
        width = tower.class_embedding.shape[-1]
        patch = tuple(tower.conv1.kernel_size)
        self.prompts = nn.Parameter(torch.empty(self.depth, self.tokens, width))  # (D, N, W)
        if placement == "ivlp":
            nn.init.normal_(self.prompts, std=PROMPTSRC_INIT_STD)
        else:
            bound = vpt_init_bound(patch, width)
            nn.init.uniform_(self.prompts, -bound, bound)

    def prompt_parameters(self) -> list[nn.Parameter]:
        """What trains when the tower is frozen (`DualHeadStudent.freeze_backbone`)."""
        return [self.prompts]

    def zero_shot(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen tower's own features, without prompts (PromptSRC's frozen CLIP image features): (B, D_embed)."""
        return self.tower(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "ivlp":
            return self._forward_ivlp(x)
        tower = self.tower
        x = tower._embeds(x)  # (B, 1 + P, W)
        n = self.tokens
        for i, block in enumerate(tower.transformer.resblocks):
            if i < self.depth and n > 0:
                rest = x[:, 1:] if i == 0 else x[:, 1 + n:]  # the patches (and below block 0 the old prompts dropped)
                prompt = self.prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, N, W)
                x = torch.cat([x[:, :1], prompt, rest], dim=1)  # (B, 1 + N + P, W)
            x = block(x)
        pooled, _ = tower._pool(x)  # (B, W): the class token
        return pooled @ tower.proj if tower.proj is not None else pooled  # (B, D_embed)

    def _forward_ivlp(self, x: torch.Tensor) -> torch.Tensor:
        """PromptSRC's (IVLP) placement: the block-0 prompts appended after the patches before ln_pre, the last N
        tokens replaced by new prompts at the input of blocks 1 .. D - 1 (muzairkhattak/PromptSRC clip/model.py)."""
        tower = self.tower
        x = tower.conv1(x)  # (B, W, g, g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, P, W)
        cls = tower.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + tower.positional_embedding.to(x.dtype)  # (B, 1 + P, W)
        x = tower.patch_dropout(x)  # identity in eval mode (a frozen tower always is)
        n = self.tokens
        for i, block in enumerate(tower.transformer.resblocks):
            if i < self.depth and n > 0:
                prompt = self.prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, N, W)
                x = torch.cat([x if i == 0 else x[:, :-n], prompt], dim=1)  # (B, 1 + P + N, W)
                if i == 0:
                    x = tower.ln_pre(x)  # the input prompts are normalised with the tokens, as PromptSRC's
            elif i == 0:
                x = tower.ln_pre(x)
            x = block(x)
        pooled, _ = tower._pool(x)  # (B, W): the class token
        return pooled @ tower.proj if tower.proj is not None else pooled  # (B, D_embed)


COOP_INIT_STD = 0.02  # CoOp's generic context: ctx ~ N(0, 0.02^2) (KaiyangZhou/CoOp, CTX_INIT "")


def coop_prompts(classnames: list[str], n_ctx: int) -> list[str]:
    """CoOp's prompt texts, the class token at the end: "X X ... X {class name}." with n_ctx placeholders "X"
    (their embeddings are replaced by the learned context) and underscores in class names read as spaces."""
    return [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in classnames]


class CoopHead(nn.Module):
    """CoOp's classifier (Zhou et al. 2022: one context shared by all classes, the class token at the end) as ce_head,
    through the student's own frozen CLIP text tower; only ``context`` (N, W) trains.

        e_c = [E(SOS); ctx_1 .. ctx_N; E(class c's tokens); E(.); E(EOS); E(pad) ...]   # (C, L, W), E = token embedding
        t_c = ln_final(transformer(e_c + pos))[EOT_c] @ text_projection                 # (C, D): `class_weights`
        ce_logits = cos(z, t_c) / zeta,  1 / zeta = exp(logit_scale) of the student's CLIP   # (B, C)

    The last line is `CosineHead`'s: `fixed_state` turns the head into a CosineHead holding t_c (model.pt), so every
    reader works without the text tower; the checkpoint keeps the context and the tower (a resume is exact). The
    tower stays in eval mode; in eval mode without gradients t_c is computed once per context value."""

    def __init__(self, clip_model: nn.Module, tokenizer: Callable, classnames: list[str], n_ctx: int, logit_scale: float):
        super().__init__()
        from open_clip.transformer import text_global_pool

        self._pool = text_global_pool
        self.n_ctx = int(n_ctx)
        self.logit_scale = float(logit_scale)  # recorded in build_args: the fixed head's zeta is computed alike
        self.zeta = 1.0 / self.logit_scale
        self.register_buffer("tokens", tokenizer(coop_prompts(classnames, n_ctx)))  # (C, L) token ids
        for part in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            setattr(self, part, getattr(clip_model, part))
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)  # (L, L) causal, rebuilt by open_clip
        self.pool_type, self.eos_id = clip_model.text_pool_type, getattr(clip_model, "text_eos_id", None)
        self.requires_grad_(False)
        width = self.token_embedding.weight.shape[1]
        self.context = nn.Parameter(torch.empty(self.n_ctx, width))  # (N, W)
        nn.init.normal_(self.context, std=COOP_INIT_STD)
        self._cached: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (context, t) of the last eval-mode call

    def train(self, mode: bool = True) -> "CoopHead":
        self.training = mode  # the text tower itself always in eval mode (frozen, as CoOp's)
        for child in self.children():
            child.eval()
        return self

    def class_weights(self) -> torch.Tensor:
        """t_c of every class: (C, D) float32, not normalised (the head normalises, as CosineHead)."""
        emb = self.token_embedding(self.tokens)  # (C, L, W)
        ctx = self.context.to(emb.dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)  # (C, N, W)
        x = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx:]], dim=1)  # (C, L, W): SOS, context, class tokens, EOS
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))  # (C, L, W)
        x = self._pool(x, self.tokens, self.pool_type, eos_token_id=self.eos_id)  # (C, W): the EOT token
        proj = self.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (C, D)
        return x.float()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            t = self.class_weights()  # (C, D)
        else:  # evaluation: the text tower once per context value, not once per batch
            if self._cached is None or not torch.equal(self._cached[0], self.context):
                self._cached = (self.context.detach().clone(), self.class_weights())
            t = self._cached[1]
        with torch.autocast(device_type=z.device.type, enabled=False):  # float32, as CosineHead
            return F.normalize(z.float(), dim=-1) @ F.normalize(t, dim=-1).t() / self.zeta  # (B, C)

    def extra_repr(self) -> str:
        return f"n_ctx={self.n_ctx}, num_classes={self.tokens.shape[0]}, zeta={self.zeta}"


PROMPTSRC_INIT_STD = 0.02  # PromptSRC's deep prompts (both towers) and a context past its init words: N(0, 0.02^2)
PROMPTSRC_CTX_INIT = "a photo of a"  # its configs' CTX_INIT: the first text context, for N <= 4 tokens
PROMPTSRC_TEMPLATE_COUNT = 60  # its IMAGENET_TEMPLATES: the first 60 of CLIP's 80 ImageNet prompts (as a set)


def promptsrc_prompts(classnames: list[str], n_ctx: int) -> list[str]:
    """PromptSRC's prompt texts: "a photo of a {class name}." for N <= 4 context tokens (the first N words' embeddings
    become the context, the rest stay fixed tokens), else "X X ... X {class name}." as CoOp's (a random context)."""
    if n_ctx <= 4:
        return [f"{PROMPTSRC_CTX_INIT} {name.replace('_', ' ')}." for name in classnames]
    return coop_prompts(classnames, n_ctx)


def promptsrc_templates() -> list[str]:
    """The templates of PromptSRC's frozen text features: open_clip's first 60 OPENAI_IMAGENET_TEMPLATES, the set of
    PromptSRC's IMAGENET_TEMPLATES (its order differs: the template mean differs by rounding only)."""
    import open_clip

    return [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES[:PROMPTSRC_TEMPLATE_COUNT]]


class PromptSrcHead(CoopHead):
    """PromptSRC's text side (Khattak et al. 2023, its IVLP prompts) as ce_head: CoopHead's first-layer context
    (initialised from the embeddings of "a photo of a" for N <= 4) plus new text prompts at the input of blocks
    1 .. D - 1 (``deep``, (D - 1, N, W), N(0, 0.02^2)), each replacing the N tokens after SOS that the block before
    output. ``frozen_text`` (C, D) holds the frozen text tower's class features (L2-normalised mean over PromptSRC's 60
    templates) for L_SCL-text; in training each forward keeps its class features in ``text_features`` for the loss.
    Model files hold the class weights of the prompts as CoOp's do (`fixed_state`)."""

    def __init__(self, clip_model: nn.Module, tokenizer: Callable, classnames: list[str], n_ctx: int, depth: int,
                 logit_scale: float, frozen_text: torch.Tensor):
        super().__init__(clip_model, tokenizer, classnames, n_ctx, logit_scale)
        self.depth = int(depth)
        self.tokens = tokenizer(promptsrc_prompts(classnames, n_ctx))  # (C, L): the EOT positions of these texts
        width = self.token_embedding.weight.shape[1]
        with torch.no_grad():
            if n_ctx <= 4:  # PromptSRC: the context starts as the embeddings of its init words (the draw is skipped)
                init = tokenizer([PROMPTSRC_CTX_INIT])[0, 1:1 + n_ctx]
                self.context.copy_(self.token_embedding.weight[init])
            else:
                nn.init.normal_(self.context, std=PROMPTSRC_INIT_STD)
        self.deep = nn.Parameter(torch.empty(self.depth - 1, self.n_ctx, width))  # (D - 1, N, W)
        nn.init.normal_(self.deep, std=PROMPTSRC_INIT_STD)
        self.register_buffer("frozen_text", F.normalize(frozen_text.float(), dim=-1))  # (C, D)
        self.text_features: Optional[torch.Tensor] = None  # t_c of the last training forward (its graph kept)

    def class_weights(self) -> torch.Tensor:
        """t_c of every class through the prompted text tower: (C, D) float32, not normalised."""
        emb = self.token_embedding(self.tokens)  # (C, L, W)
        c, n = emb.shape[0], self.n_ctx
        ctx = self.context.to(emb.dtype).unsqueeze(0).expand(c, -1, -1)  # (C, N, W)
        x = torch.cat([emb[:, :1], ctx, emb[:, 1 + n:]], dim=1) + self.positional_embedding.to(emb.dtype)  # (C, L, W)
        for i, block in enumerate(self.transformer.resblocks):
            if 1 <= i < self.depth:  # the prompts of block i replace what block i - 1 made of the old ones
                deep = self.deep[i - 1].to(x.dtype).unsqueeze(0).expand(c, -1, -1)  # (C, N, W)
                x = torch.cat([x[:, :1], deep, x[:, 1 + n:]], dim=1)
            x = block(x, attn_mask=self.attn_mask)
        x = self._pool(self.ln_final(x), self.tokens, self.pool_type, eos_token_id=self.eos_id)  # (C, W): EOT
        proj = self.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (C, D)
        return x.float()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            t = self.class_weights()  # (C, D)
            self.text_features = t if self.training else None
        else:  # evaluation: the text tower once per prompt value
            key = torch.cat([self.context.flatten(), self.deep.flatten()])
            if self._cached is None or not torch.equal(self._cached[0], key):
                self._cached = (key.detach().clone(), self.class_weights())
            t = self._cached[1]
        with torch.autocast(device_type=z.device.type, enabled=False):  # float32, as CosineHead
            return F.normalize(z.float(), dim=-1) @ F.normalize(t, dim=-1).t() / self.zeta  # (B, C)

    def frozen_logits(self, frozen_image: torch.Tensor) -> torch.Tensor:
        """PromptSRC's zero-shot logits of the frozen towers: exp(logit_scale) cos(f, g_c), (B, C) float32."""
        with torch.autocast(device_type=frozen_image.device.type, enabled=False):
            return F.normalize(frozen_image.float(), dim=-1) @ self.frozen_text.t() / self.zeta

    def extra_repr(self) -> str:
        return f"n_ctx={self.n_ctx}, depth={self.depth}, num_classes={self.tokens.shape[0]}, zeta={self.zeta}"


def check_promptsrc(model: nn.Module, tokens: int, depth: int, name: str) -> None:
    """PromptSRC needs what CoOp's context needs, a batch-first text transformer and both towers `depth` blocks deep."""
    if not all(hasattr(model, part) for part in ("token_embedding", "transformer", "ln_final", "attn_mask")):
        raise ConfigError(f"--promptsrc-tokens prompts an open_clip text transformer; student {name!r} has a "
                          f"{type(model).__name__} text tower: use an OpenAI-style CLIP student (e.g. ViT-B-16)")
    length = int(model.positional_embedding.shape[0])
    if not 1 <= tokens <= length - 3:
        raise ConfigError(f"--promptsrc-tokens must be 1 to {length - 3} (the text context length {length} less SOS, a "
                          f"class token and EOS); got {tokens}")
    if not model.transformer.batch_first:
        raise ConfigError(f"--promptsrc-tokens needs a batch-first text transformer (student {name!r}'s is not)")
    blocks = min(len(model.transformer.resblocks), len(model.visual.transformer.resblocks))
    if not 1 <= depth <= blocks:
        raise ConfigError(f"--promptsrc-depth must be 1 to {blocks} (the blocks of {name!r}'s shallower tower); got {depth}")


def fixed_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict the model file holds (on CPU): as the student's, but a CoOp ce_head becomes a CosineHead's
    weight, its class weights t_c (`rebuild_student` builds that CosineHead): no text tower in model.pt."""
    state = student.state_dict()
    if isinstance(getattr(student, "ce_head", None), CoopHead):
        state = {k: v for k, v in state.items() if not k.startswith("ce_head.")}
        with torch.no_grad():
            state["ce_head.weight"] = student.ce_head.class_weights()  # (C, D)
    return {k: v.detach().cpu() for k, v in state.items()}


def check_coop(model: nn.Module, n_ctx: int, name: str) -> None:
    """CoOp needs an open_clip CLIP with its own text transformer (not an HF text tower) and room for the context."""
    if not all(hasattr(model, part) for part in ("token_embedding", "transformer", "ln_final", "attn_mask")):
        raise ConfigError(f"--coop-context learns a context through an open_clip text transformer; student {name!r} has "
                          f"a {type(model).__name__} text tower: use an OpenAI-style CLIP student (e.g. ViT-B-16) or drop it")
    length = int(model.positional_embedding.shape[0])
    if not 1 <= n_ctx <= length - 3:  # SOS, the context, at least one class token, EOS
        raise ConfigError(f"--coop-context must be 1 to {length - 3} (the text context length {length} less SOS, a class "
                          f"token and EOS); got {n_ctx}")


def check_vpt(tower: nn.Module, tokens: int, depth: int, name: str) -> None:
    """VPT-deep needs a batch-first open_clip ViT that pools its class token and has at least `depth` blocks."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(tower, VisionTransformer):
        raise ConfigError(f"--vpt-tokens prompts an open_clip ViT image tower; student {name!r} has a "
                          f"{type(tower).__name__}: use a ViT student (e.g. ViT-B-16) or drop --vpt-tokens")
    if tower.attn_pool is not None or tower.pool_type != "tok" or not tower.transformer.batch_first:
        raise ConfigError(f"--vpt-tokens needs a ViT that pools its class token (student {name!r} pools "
                          f"{tower.pool_type!r}{' with an attention pooler' if tower.attn_pool is not None else ''}); "
                          "drop --vpt-tokens")
    blocks = len(tower.transformer.resblocks)
    if not 1 <= depth <= blocks:
        raise ConfigError(f"--vpt-depth must be 1 to {blocks} (the blocks of {name!r}); got {depth}")
    if tokens < 1:
        raise ConfigError(f"--vpt-tokens must be >= 1; got {tokens}")


# --------------------------------------------------------------------------------------------
# torchvision students
# --------------------------------------------------------------------------------------------


class _TinyResNet(ResNet):
    """torchvision ResNet with BasicBlocks [1, 1, 1, 1] and narrow stages, for tests."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128), num_classes: int = 1000):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], 1)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


# name -> (builder(weights) -> model, classifier attribute, feature dim, default image size)
_TORCHVISION_STUDENTS: dict[str, tuple[Callable[..., nn.Module], str, int, int]] = {
    "resnet18": (lambda weights=None: torchvision.models.resnet18(weights=weights), "fc", 512, 224),
    "resnet50": (lambda weights=None: torchvision.models.resnet50(weights=weights), "fc", 2048, 224),
    "mobilenet_v2": (lambda weights=None: torchvision.models.mobilenet_v2(weights=weights), "classifier", 1280, 224),
    "resnet-tiny": (lambda weights=None: _TinyResNet(), "fc", 128, 32),
}


def _load_backbone_checkpoint(backbone: nn.Module, path: Path, classifier: str) -> None:
    """Load a local torchvision-style checkpoint (plain state_dict, or under 'state_dict' /
    'model' / 'teacher' as in DINO) into the backbone, ignoring the classifier."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / pickled-object files
        raise ConfigError(
            f"cannot read student checkpoint {path}: {e}. It must be a torch.save'd state_dict of "
            "tensors (or a dict holding one under 'state_dict', 'model' or 'teacher'); re-save just "
            "the state_dict if it also pickles Python objects."
        ) from e
    if isinstance(ckpt, dict):
        for wrapper in ("state_dict", "model", "teacher"):
            if wrapper in ckpt and isinstance(ckpt[wrapper], dict):
                ckpt = ckpt[wrapper]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ConfigError(f"student checkpoint {path} holds no state_dict of tensors")
    state = {k: v for k, v in strip_prefixes(ckpt).items() if not k.startswith(classifier + ".")}
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(classifier + ".")]
    if missing:
        raise ConfigError(
            f"student checkpoint {path} lacks {len(missing)} backbone weights (e.g. {missing[:5]}); "
            f"is it a checkpoint of this architecture? Keys seen: {list(state)[:5]}"
        )
    if result.unexpected_keys:
        warnings.warn(
            f"student checkpoint {path}: ignored {len(result.unexpected_keys)} keys that are not part "
            f"of the backbone (e.g. {result.unexpected_keys[:5]})",
            stacklevel=3,
        )


def _build_torchvision(name: str, pretrained: Optional[str]) -> tuple[nn.Module, int, Preprocessing]:
    builder, classifier, dim, size = _TORCHVISION_STUDENTS[name]
    preprocess = Preprocessing(size, "bilinear", IMAGENET_MEAN, IMAGENET_STD, "shortest")
    if pretrained is not None and Path(pretrained).is_file():
        model = builder()
        _load_backbone_checkpoint(model, Path(pretrained), classifier)
    elif pretrained is not None:
        if name not in torchvision.models.list_models():
            raise ConfigError(f"student {name!r} has no torchvision weights; give --pretrained none or a checkpoint file")
        try:
            weights = torchvision.models.get_model_weights(name)[pretrained]
        except KeyError:
            known = list(torchvision.models.get_model_weights(name).__members__)
            raise ConfigError(
                f"--pretrained {pretrained!r} is neither a file nor a torchvision weights name for "
                f"{name} (known: {known})"
            ) from None
        try:
            model = builder(weights)  # downloads into the torch hub cache unless already there
        except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError; a cut download a RuntimeError
            raise ConfigError(
                f"student {name} weights {pretrained!r} are not in the torch hub cache ({torch.hub.get_dir()}) and could "
                f"not be downloaded ({type(e).__name__}); offline, download them elsewhere and pass the file with "
                "--student-pretrained PATH"
            ) from None
        preprocess = preprocess.replace(image_size=int(weights.transforms().crop_size[0]))
    else:
        model = builder()
    setattr(model, classifier, nn.Identity())  # g(x) = penultimate pooled feature (B, D)
    return model, dim, preprocess


# --------------------------------------------------------------------------------------------
# open_clip students
# --------------------------------------------------------------------------------------------


def _clip_source(name: str) -> Optional[str]:
    """The open_clip model name or config path behind a student name, or None (not a VLM)."""
    if name.startswith("clip:"):
        return name[len("clip:"):]
    if name.endswith(".json"):
        return name
    if name in _TORCHVISION_STUDENTS:
        return None
    import open_clip

    return name if name in open_clip.list_models() else None


def _register_clip_config(source: str) -> str:
    """Make an open_clip model name out of a config path (registered with open_clip)."""
    import open_clip

    if not source.endswith(".json"):
        if source not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip model {source!r}; see open_clip.list_models() or give a config .json")
        return source
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"open_clip model config {path} not found")
    cfg = json.loads(path.read_text())
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"open_clip model config {path} needs the keys embed_dim, vision_cfg, text_cfg")
    open_clip.add_model_config(path)
    return path.stem


def _clip_preprocess(model: nn.Module) -> Preprocessing:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ConfigError(f"non-square open_clip input size {size} is not supported for students")
        size = size[0]
    return Preprocessing(int(size), cfg.get("interpolation", "bicubic"), cfg["mean"], cfg["std"],
                         cfg.get("resize_mode", "shortest"))


@torch.no_grad()
def _text_classifier(model: nn.Module, model_name: str, classnames: list[str], templates: list[str], device,
                     normalized: bool = True) -> torch.Tensor:
    """(C, D) class text embeddings for head init.

    normalized: per class, the mean of L2-normalised template embeddings, re-normalised (Eq. 1);
    else the plain mean of the raw template embeddings (the reference code's student init).
    """
    import open_clip

    tokenizer = open_clip.get_tokenizer(model_name)
    model = model.to(device).eval()
    rows = []
    for classname in classnames:
        tokens = tokenizer(fill_templates(templates, [classname])).to(device)  # (T, L): one class per batch
        emb = model.encode_text(tokens, normalize=normalized).float()  # (T, D)
        rows.append(template_mean(emb, renormalize=normalized))  # (D,)
    return torch.stack(rows).cpu()  # (C, D)


def _build_open_clip(source: str, pretrained: Optional[str]) -> tuple[nn.Module, nn.Module, str, dict]:
    """-> (full CLIP model, its image tower, registered model name, model config)."""
    import open_clip

    model_name = _register_clip_config(source)
    if pretrained is not None and not Path(pretrained).is_file() and Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise ConfigError(f"student checkpoint {pretrained} not found")
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    if tag_cfg and bool(tag_cfg.get("quick_gelu", False)) != bool(open_clip.get_model_config(model_name).get("quick_gelu", False)):
        other = f"{model_name}-quickgelu" if tag_cfg.get("quick_gelu") else model_name.removesuffix("-quickgelu")
        raise ConfigError(
            f"pretrained tag {pretrained!r} was trained with quick_gelu={bool(tag_cfg.get('quick_gelu'))} but student "
            f"{model_name} uses the other activation; use --student {other}, or the features are silently wrong"
        )
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, output_dict=True)
    except RuntimeError as e:
        raise ConfigError(
            f"cannot load open_clip student {model_name!r} with pretrained={pretrained!r}: {e}. "
            "Offline, pass a local checkpoint file with --pretrained PATH."
        ) from e
    cfg = copy.deepcopy(open_clip.get_model_config(model_name))
    return model, model.visual, model_name, cfg


def _rebuild_clip_tower(cfg: dict) -> nn.Module:
    """Image tower only, random init, from a stored model config (no download, no text tower)."""
    from open_clip.model import _build_vision_tower  # open_clip's own tower builder

    vision_cfg = copy.deepcopy(cfg["vision_cfg"])
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    return _build_vision_tower(cfg["embed_dim"], vision_cfg, cfg.get("quick_gelu", False))


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def list_students() -> list[str]:
    """Registered CNN students, then the form of timm students, ``timm/<timm model name>`` (not itself a
    name; any ``timm.list_models()`` name fits). Any open_clip model name or config path also works."""
    return [*_TORCHVISION_STUDENTS, TIMM_PREFIX + "<timm model name>"]


def build_student(
    name: str,
    num_classes: int,
    *,
    pretrained: Optional[str] = None,
    classnames: Optional[list[str]] = None,
    templates: Optional[list[str]] = None,
    init_heads_from_text: bool = True,
    align_kd_head: bool = True,
    text_init_heads: str = "both",
    zeta: float = ZETA,
    vlm_heads: str = "reference",
    ce_head: str = "linear",
    kd_head: str = "linear",
    head_hidden: Optional[int] = None,
    head_dropout: float = HEAD_DROPOUT,
    interpolation: Optional[str] = None,
    vpt_tokens: int = 0,
    vpt_depth: int = 0,
    coop_context: int = 0,
    promptsrc_tokens: int = 0,
    promptsrc_depth: int = 0,
    device: str | torch.device = "cpu",
) -> DualHeadStudent:
    """Build a dual-head student (on CPU).

    name: ``resnet18`` | ``resnet50`` | ``mobilenet_v2`` | ``resnet-tiny`` | ``timm/ARCH[.TAG]``
        (any timm model) | ``clip:NAME`` | an open_clip model name | a path to an open_clip
        model-config JSON.
    pretrained: None / "none" (random init); for CNNs a torchvision weights name
        (``IMAGENET1K_V1``, downloads) or a local checkpoint file; for timm students "timm" (the
        tag of the name, else timm's default tag), a tag (``a1_in1k``, ``timm/resnet18.a1_in1k``),
        read from the local Hugging Face cache only, or a local state_dict / safetensors file; for
        open_clip a pretrained tag (downloads) or a local checkpoint file.
    classnames, templates: for language-aware init of VLM students (templates contain ``{}``;
        default ``["a photo of a {}."]``).
    init_heads_from_text, text_init_heads, align_kd_head, vlm_heads: VLM students only (see module docstring).
    zeta: the aligned head's fixed temperature (logit scale 1 / zeta), Eq. 10.
    ce_head, kd_head: ``linear`` | ``mlp`` (§E.2); head_hidden (H, default the feature dim D), head_dropout: the
        mlp heads' (see module docstring).
    interpolation: resampling of the student's views and evaluation images (default: the
        student's own: bilinear for torchvision CNNs, the data config's for timm students, the
        open_clip config's for VLM students).
    vpt_tokens, vpt_depth: VPT-deep (`VptTower`) for open_clip ViT students: N prompt tokens at the first D blocks;
        0 (default): the plain tower.
    coop_context: CoOp (`CoopHead`) for open_clip CLIP students: ce_head is the class text embeddings of N learned
        context vectors through the student's frozen text tower (language-aware init then sets kd_head only);
        0 (default): a linear ce_head.
    promptsrc_tokens, promptsrc_depth: PromptSRC (IVLP prompts) for open_clip CLIP students: N prompt tokens at the
        first D blocks of both towers; the image tower in `VptTower`'s "ivlp" placement, ce_head `PromptSrcHead`
        (language-aware init then sets kd_head only); 0 (default): neither.
    device: where the text encoder runs for language-aware init (and PromptSRC's frozen text features).
    """
    if pretrained is not None and str(pretrained).lower() == "none":
        pretrained = None
    pretrained = None if pretrained is None else str(pretrained)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if vlm_heads not in VLM_HEADS:
        raise ConfigError(f"--vlm-heads must be one of {', '.join(VLM_HEADS)}, got {vlm_heads!r}")
    if text_init_heads not in TEXT_INIT_HEADS:
        raise ConfigError(f"--text-init-heads must be one of {', '.join(TEXT_INIT_HEADS)}, got {text_init_heads!r}")
    if interpolation is not None and interpolation not in ("bilinear", "bicubic"):
        raise ConfigError(f"--interpolation must be bilinear or bicubic, got {interpolation!r}")
    for option, form in (("--ce-head", ce_head), ("--kd-head", kd_head)):
        if form not in HEAD_FORMS:
            raise ConfigError(f"{option} must be one of {', '.join(HEAD_FORMS)}, got {form!r}")
    forms = {"ce_head": ce_head, "kd_head": kd_head, "head_hidden": head_hidden, "head_dropout": float(head_dropout)}
    if (vpt_tokens or vpt_depth) and (name.startswith(TIMM_PREFIX) or name in _TORCHVISION_STUDENTS):
        raise ConfigError(f"--vpt-tokens prompts an open_clip ViT image tower; {name!r} is a CNN student: use a ViT "
                          "student (e.g. ViT-B-16) or drop --vpt-tokens / --vpt-depth")
    if coop_context and (name.startswith(TIMM_PREFIX) or name in _TORCHVISION_STUDENTS):
        raise ConfigError(f"--coop-context learns a prompt for a CLIP text tower; {name!r} is a CNN student without one: "
                          "use an open_clip student (e.g. ViT-B-16) or drop --coop-context")
    if coop_context and ce_head != "linear":
        raise ConfigError("--coop-context makes ce_head CoOp's text classifier; drop --ce-head mlp")
    if promptsrc_tokens or promptsrc_depth:
        if name.startswith(TIMM_PREFIX) or name in _TORCHVISION_STUDENTS:
            raise ConfigError(f"--promptsrc-tokens prompts both towers of a CLIP; {name!r} is a CNN student without them: "
                              "use an open_clip student (e.g. ViT-B-16) or drop --promptsrc-tokens")
        if not (promptsrc_tokens and promptsrc_depth):
            raise ConfigError(f"PromptSRC needs both --promptsrc-tokens N and --promptsrc-depth D >= 1 (got {promptsrc_tokens} "
                              f"and {promptsrc_depth})")
        if coop_context or vpt_tokens or vpt_depth or ce_head != "linear":
            raise ConfigError("--promptsrc-tokens brings its own text classifier and visual prompts; drop --coop-context, "
                              "--vpt-tokens / --vpt-depth and --ce-head mlp")
    if name.startswith(TIMM_PREFIX):
        backbone, dim, preprocess, timm_name = build_timm(name, pretrained, interpolation)
        build_args = {"name": name, "kind": "timm", "timm_name": timm_name, "num_classes": num_classes,
                      "feature_dim": dim, "align_kd_head": False, "zeta": zeta, "pretrained": pretrained,
                      "init_heads_from_text": False, **_head_args(forms, dim)}
        return DualHeadStudent(backbone, dim, num_classes, False, zeta, preprocess, build_args, **_head_kwargs(build_args))
    check_student(name)  # an unknown name: one line with the close names (dho/names.py, also run before torch loads)
    source = _clip_source(name)

    if source is None:
        backbone, dim, preprocess = _build_torchvision(name, pretrained)
        if interpolation is not None:
            preprocess = preprocess.replace(interpolation=interpolation)
        build_args = {"name": name, "kind": "torchvision", "num_classes": num_classes, "feature_dim": dim,
                      "align_kd_head": False, "zeta": zeta, "pretrained": pretrained, "init_heads_from_text": False,
                      **_head_args(forms, dim)}
        return DualHeadStudent(backbone, dim, num_classes, False, zeta, preprocess, build_args, **_head_kwargs(build_args))

    text_heads = [h for h in {"both": ("ce_head", "kd_head"), "ce": ("ce_head",), "kd": ("kd_head",)}[text_init_heads]
                  if forms[h] == "linear" and not ((coop_context or promptsrc_tokens) and h == "ce_head")]  # the text
    # embeddings are in z's space: mlp heads start as with the init off; a CoOp / PromptSRC ce_head is its own classifier
    if init_heads_from_text and not text_heads and text_init_heads != "both":
        what = ("CoOp's ce_head (its own text classifier)" if coop_context else
                "PromptSRC's ce_head (its own text classifier)" if promptsrc_tokens else "an mlp head")
        raise ConfigError(f"--text-init-heads {text_init_heads} names {what}, which language-aware init does not set "
                          "(it sets linear heads only); use --text-init-heads both or --no-text-init")
    if init_heads_from_text:
        if classnames is None or len(classnames) != num_classes:
            raise ConfigError(
                f"language-aware head init of {name!r} needs {num_classes} class names "
                f"(got {None if classnames is None else len(classnames)}); pass classnames= or "
                "init_heads_from_text=False"
            )
        templates = resolve_templates(templates or STUDENT_INIT_TEMPLATES)
    model, tower, model_name, cfg = _build_open_clip(source, pretrained)
    dim = int(cfg["embed_dim"])
    preprocess = _clip_preprocess(model)
    if interpolation is not None:
        preprocess = preprocess.replace(interpolation=interpolation)
    text_weights = (_text_classifier(model, model_name, classnames, templates, device, normalized=vlm_heads == "eq10")
                    if init_heads_from_text and text_heads else None)
    coop = None
    if coop_context:
        import open_clip

        check_coop(model, coop_context, name)
        if classnames is None or len(classnames) != num_classes:
            raise ConfigError(f"--coop-context needs the {num_classes} class names (got "
                              f"{None if classnames is None else len(classnames)}); pass classnames=")
        coop = CoopHead(model.cpu(), open_clip.get_tokenizer(model_name), classnames, coop_context,
                        float(model.logit_scale.detach().exp()))
    elif promptsrc_tokens:
        import open_clip

        check_promptsrc(model, promptsrc_tokens, promptsrc_depth, name)
        check_vpt(tower, promptsrc_tokens, promptsrc_depth, name)
        if classnames is None or len(classnames) != num_classes:
            raise ConfigError(f"--promptsrc-tokens needs the {num_classes} class names (got "
                              f"{None if classnames is None else len(classnames)}); pass classnames=")
        frozen_text = _text_classifier(model, model_name, classnames, promptsrc_templates(), device, normalized=False)
        coop = PromptSrcHead(model.cpu(), open_clip.get_tokenizer(model_name), classnames, promptsrc_tokens,
                             promptsrc_depth, float(model.logit_scale.detach().exp()), frozen_text)
    tower = tower.cpu()
    del model  # the text encoder is used only for init (and with CoOp its tower lives on in ce_head)
    vpt = _vpt_args(vpt_tokens, vpt_depth)
    if vpt:
        check_vpt(tower, vpt_tokens, vpt_depth, name)
        tower = VptTower(tower, vpt_tokens, vpt_depth)
    if promptsrc_tokens:
        tower = VptTower(tower, promptsrc_tokens, promptsrc_depth, placement="ivlp")
    build_args = {"name": name, "kind": "open_clip", "num_classes": num_classes, "feature_dim": dim,
                  "align_kd_head": bool(align_kd_head), "zeta": zeta, "pretrained": pretrained,
                  "init_heads_from_text": bool(init_heads_from_text), "clip_config": cfg,
                  "text_init_heads": text_init_heads if init_heads_from_text else None,
                  "templates": templates if init_heads_from_text else None, "vlm_heads": vlm_heads,
                  **_head_args(forms, dim), **vpt,
                  **({"coop_context": int(coop_context), "coop_logit_scale": coop.logit_scale} if coop_context else {}),
                  **({"promptsrc_tokens": int(promptsrc_tokens), "promptsrc_depth": int(promptsrc_depth),
                      "promptsrc_logit_scale": coop.logit_scale} if promptsrc_tokens else {})}
    student = DualHeadStudent(tower, dim, num_classes, bool(align_kd_head), zeta, preprocess, build_args, vlm_heads,
                              **_head_kwargs(build_args))
    if coop is not None:
        student.ce_head = coop  # after the linear heads' init: the RNG draws of the other heads are as without CoOp
    if text_weights is not None:
        with torch.no_grad():
            for head in (getattr(student, h) for h in text_heads):
                head.weight.copy_(text_weights)  # (C, D): unit rows (eq10) or raw template means (reference)
                if getattr(head, "bias", None) is not None:
                    head.bias.zero_()
    return student


def _head_args(forms: dict, dim: int) -> dict:
    """The build args of the head forms: none for two linear heads (model files as before the option), else the
    forms, H (resolved: the feature dim D by default) and the dropout."""
    if forms["ce_head"] == forms["kd_head"] == "linear":
        return {}
    return {**forms, "head_hidden": int(forms["head_hidden"] or dim)}


def _vpt_args(tokens: int, depth: int) -> dict:
    """The build args of VPT: none without prompts (model files as before the option)."""
    return {"vpt_tokens": int(tokens), "vpt_depth": int(depth)} if tokens or depth else {}


def _head_kwargs(build_args: dict) -> dict:
    """DualHeadStudent's head arguments from build args (files without them hold two linear heads)."""
    return {"ce_head": build_args.get("ce_head", "linear"), "kd_head": build_args.get("kd_head", "linear"),
            "head_hidden": build_args.get("head_hidden"), "head_dropout": float(build_args.get("head_dropout", HEAD_DROPOUT))}


def rebuild_student(build_args: dict, preprocess: Preprocessing) -> DualHeadStudent:
    """Rebuild the architecture described by ``student.build_args`` (random init, offline)."""
    kind = build_args.get("kind")
    if kind == "torchvision":
        backbone, dim, _ = _build_torchvision(build_args["name"], None)
    elif kind == "timm":
        dim = int(build_args["feature_dim"])
        backbone = rebuild_timm(build_args["timm_name"], dim)
    elif kind == "open_clip":
        backbone, dim = _rebuild_clip_tower(build_args["clip_config"]), int(build_args["feature_dim"])
        if build_args.get("vpt_tokens"):
            backbone = VptTower(backbone, build_args["vpt_tokens"], build_args["vpt_depth"])
        if build_args.get("promptsrc_tokens"):
            backbone = VptTower(backbone, build_args["promptsrc_tokens"], build_args["promptsrc_depth"], placement="ivlp")
    else:
        raise ConfigError(f"unknown student kind {kind!r} in build args {build_args}")
    # model files written before the option existed hold the Eq. 10 heads
    student = DualHeadStudent(backbone, dim, int(build_args["num_classes"]), bool(build_args["align_kd_head"]),
                              float(build_args["zeta"]), preprocess, build_args, build_args.get("vlm_heads", "eq10"),
                              **_head_kwargs(build_args))
    scale = build_args.get("coop_logit_scale") or build_args.get("promptsrc_logit_scale")
    if scale:  # CoOp's / PromptSRC's ce_head, fixed: its class weights t_c (`fixed_state`)
        student.ce_head = CosineHead(dim, student.num_classes, 1.0 / float(scale))
    return student


def save_student(
    path: str | Path,
    student: DualHeadStudent,
    classnames: list[str],
    alpha: float = 0.5,
    beta: float = 0.5,
    extra: Optional[dict] = None,
    raw: Optional[DualHeadStudent] = None,
) -> Path:
    """Write a self-describing model file (atomically: a crash never leaves a partial file).

    Holds build_args, state_dict (CPU), classnames, preprocess, alpha, beta (Eq. 11 defaults
    of this run), dho version and ``extra`` (JSON-like metadata, e.g. the run's method).
    With ``raw`` (`dho distill --ema`: `student` is the EMA), also raw_state_dict, its trained weights.
    """
    path = Path(path)
    if len(classnames) != student.num_classes:
        raise ConfigError(f"{len(classnames)} class names for a student with {student.num_classes} classes")
    payload: dict[str, Any] = {
        "format": MODEL_FILE_FORMAT,
        "version": MODEL_FILE_VERSION,
        "dho_version": dho.__version__,
        "build_args": student.build_args,
        "preprocess": student.preprocess.to_dict(),
        "classnames": list(classnames),
        "alpha": float(alpha),
        "beta": float(beta),
        "extra": extra or {},
        "state_dict": fixed_state(student),  # a CoOp ce_head as its class weights
    }
    if raw is not None:
        payload["raw_state_dict"] = fixed_state(raw)
    # the part file is model.pt.part: torch.save names the folder inside its zip "model.pt" from it, so the bytes
    # do not depend on the temporary name
    return write_atomic(path, lambda part: torch.save(payload, part))


def load_student(path: str | Path, map_location: str | torch.device = "cpu",
                 weights: Optional[str] = None) -> tuple[DualHeadStudent, dict]:
    """-> (student in eval mode, meta) where meta has classnames, preprocess, alpha, beta,
    build_args, extra, dho_version and weights (ema | raw). Rebuilds offline from the file alone.

    weights: None (the file's model: the EMA of a `dho distill --ema` run), "ema" (an error without one) or
    "raw" (the trained weights: raw_state_dict beside an EMA, else the only ones)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt / truncated / not a torch file
        raise ConfigError(f"cannot read model file {path}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FILE_FORMAT:
        raise ConfigError(f"{path} is not a dho student model file (written by dho distill / save_student)")
    if payload.get("version") != MODEL_FILE_VERSION:
        raise ConfigError(f"{path} has model file version {payload.get('version')}; this dho reads version {MODEL_FILE_VERSION}")
    has_ema = "raw_state_dict" in payload
    if weights not in (None, *WEIGHTS):
        raise ConfigError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if weights == "ema" and not has_ema:
        raise ConfigError(f"{path} holds no EMA weights (its run trained without --ema); drop --weights ema or use --weights raw")
    student = rebuild_student(payload["build_args"], Preprocessing.from_dict(payload["preprocess"]))
    student.load_state_dict(payload["raw_state_dict" if weights == "raw" and has_ema else "state_dict"])
    student.to(map_location).eval()
    meta = {k: payload[k] for k in ("classnames", "alpha", "beta", "build_args", "extra", "dho_version")}
    meta["weights"] = "ema" if has_ema and weights != "raw" else "raw"
    meta["preprocess"] = student.preprocess  # the record (the file holds its dict)
    return student, meta
