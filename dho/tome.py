"""Token Merging (ToMe, Bolya et al., ICLR 2023) at inference for ViT students (paper Table 9).

In every transformer block, between the attention and the MLP (as the ToMe reference code does for timm
and CLIP), r tokens are merged away by bipartite soft matching (ToMe §3, "Token Merging"):

    metric = mean over heads of the block's attention keys k      # (B, N, d_head)
    A, B   = the tokens at even, odd positions (the class token, position 0, falls in A)
    s_ab   = cos(metric_a, metric_b)                               # (B, |A|, |B|); the class token's row -inf
    each a in A keeps its best b; the r edges of highest s_ab merge their a into their b
    x_b    = (sum of size_t * x_t over b and the a merged into it) / (their summed size)   # size-weighted mean
    out    = [unmerged A in their order, all of B]                 # N - r tokens, the class token first

with r capped at (N - 1) // 2 per block (a token of A merges at most once). The sizes (how many patches a
token stands for; all 1 at the first block) travel with the tokens, and proportional attention adds
log(size) of each key to the attention logits, softmax(q k^T / sqrt(d) + log s) (ToMe Eq. 1). r is
constant over the blocks (ToMe's default schedule), so block l runs its attention on N - l r tokens and its
MLP on N - (l + 1) r (fewer where the cap binds: `token_schedule`).

`apply_tome(student, r)` rewrites the student's transformer in place; r = 0 leaves it untouched (the
unmerged model, bit for bit). The blocks' modules and parameters stay where they were, so the state_dict
keys (model files, safetensors) do not change; only the loop over the blocks, which now carries the sizes,
is replaced: `ToMeBlocks` for timm's ``blocks`` and for open_clip's ``transformer.resblocks``. Each block's
attention is recomputed from its own weights (open_clip's nn.MultiheadAttention: in_proj / out_proj;
timm's Attention: qkv, q_norm / k_norm, norm, gate, proj) with ``F.scaled_dot_product_attention``, the
log-size bias as its additive mask.

Students: open_clip ``VisionTransformer`` towers with class-token pooling and the default blocks
(``ResidualAttentionBlock``), timm ``VisionTransformer`` with one class token, ``global_pool="token"`` and
the default ``Block`` / ``Attention``. Others get a one-line ConfigError.

Out of scope: ToMe during training, r schedules other than constant (ToMe's decreasing schedule),
average or attention pooling (merged tokens would need size-weighted pooling), register / distillation
tokens, open_clip's custom blocks (qk-norm, scaled cosine attention), timm's ViT relatives (EVA, DeiT's
distilled model, ...), source tracing for visualisation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dho.errors import ConfigError, check_number

PROTECTED = 1  # the class token at position 0: never merged (ToMe's class_token=True)
SCHEDULE = "constant"  # the same r in every block (ToMe's parse_r with inflection 0)


# --------------------------------------------------------------------------------------------
# math: matching, merging, attention
# --------------------------------------------------------------------------------------------


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """ToMe's bipartite soft matching of the tokens' metric (B, N, d) with the class token (position 0) protected
    -> (kept (B, |A| - r, 1), merged (B, r, 1), into (B, r, 1)): positions within A of the kept and of the merged
    tokens, and the position within B each merged token goes into; None where nothing merges (r capped at
    (N - 1) // 2). A = positions 0, 2, 4, ..., B = 1, 3, 5, ...; kept positions in ascending order."""
    r = min(r, (metric.shape[1] - PROTECTED) // 2)
    if r <= 0:
        return None
    metric = metric / metric.norm(dim=-1, keepdim=True)  # (B, N, d) unit rows: a @ b^T is the cosine
    a, b = metric[:, ::2], metric[:, 1::2]  # (B, |A|, d), (B, |B|, d)
    scores = a @ b.transpose(-1, -2)  # (B, |A|, |B|)
    scores[:, 0, :] = float("-inf")  # the class token is never a merge's source
    best, into = scores.max(dim=-1)  # (B, |A|): each a's most similar b
    order = best.argsort(dim=-1, descending=True)[..., None]  # (B, |A|, 1), the most similar edges first
    merged, kept = order[:, :r], order[:, r:]  # (B, r, 1), (B, |A| - r, 1)
    into = into[..., None].gather(dim=1, index=merged)  # (B, r, 1)
    return kept.sort(dim=1).values, merged, into  # kept in token order: the class token stays first


def merge_tokens(x: torch.Tensor, match: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(B, N, C) -> (B, N - r, C): [kept tokens of A, tokens of B plus the sum of the A tokens merged into them]."""
    kept, merged, into = match
    c = x.shape[-1]
    a, b = x[:, ::2], x[:, 1::2]  # (B, |A|, C), (B, |B|, C)
    unmerged = a.gather(dim=1, index=kept.expand(-1, -1, c))  # (B, |A| - r, C)
    sources = a.gather(dim=1, index=merged.expand(-1, -1, c))  # (B, r, C)
    b = b.scatter_reduce(1, into.expand(-1, -1, c), sources, reduce="sum")  # (B, |B|, C)
    return torch.cat([unmerged, b], dim=1)


def merge_wavg(x: torch.Tensor, size: Optional[torch.Tensor],
               match: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: (x (B, N, C), size (B, N, 1) or None = all ones) -> (x, size) of N - r tokens,
    a merged token the mean of its members weighted by their sizes, its size their sum."""
    if size is None:
        size = torch.ones_like(x[..., :1])  # (B, N, 1)
    x = merge_tokens(x * size, match)  # (B, N - r, C)
    size = merge_tokens(size, match)  # (B, N - r, 1)
    return x / size, size


def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor],
                           scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale + log(size of each key)) v (ToMe Eq. 1) for q, k, v (B, H, N, d) and size (B, N, 1)
    (None: all ones, plain attention) -> (B, H, N, d); scale defaults to 1 / sqrt(d)."""
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)  # (B, 1, 1, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def token_schedule(num_tokens: int, layers: int, r: int) -> list[int]:
    """Tokens entering each block and leaving the last (layers + 1 counts): each block merges min(r, (N - 1) // 2)."""
    counts = [num_tokens]
    for _ in range(layers):
        n = counts[-1]
        counts.append(n - max(0, min(r, (n - PROTECTED) // 2)))
    return counts


# --------------------------------------------------------------------------------------------
# the blocks of the two tower types
# --------------------------------------------------------------------------------------------


def _merge(x: torch.Tensor, size: Optional[torch.Tensor], keys: torch.Tensor, r: int):
    match = bipartite_soft_matching(keys.mean(dim=1), r)  # keys (B, H, N, d): the metric is their mean over heads
    return (x, size) if match is None else merge_wavg(x, size, match)


def _open_clip_block(block: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor], r: int):
    """open_clip's ResidualAttentionBlock with ToMe between attention and MLP: x (B, N, D) -> (B, N - r, D), sizes."""
    attn = block.attn  # nn.MultiheadAttention (batch_first or not: x here is always (B, N, D))
    h = block.ln_1(x)
    n, t, d = h.shape
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3D)
    q, k, v = qkv.reshape(n, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
    o = proportional_attention(q, k, v, size).transpose(1, 2).reshape(n, t, d)  # (B, N, D)
    x = x + block.ls_1(attn.out_proj(o))
    x, size = _merge(x, size, k, r)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, size


def _timm_block(block: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor], r: int):
    """timm's Block / Attention with ToMe between attention and MLP: x (B, N, D) -> (B, N - r, D), sizes."""
    attn = block.attn
    h = block.norm1(x)
    n, t, _ = h.shape
    gate = getattr(attn, "gate", None)
    gate = gate(h).sigmoid() if gate is not None else None
    qkv = attn.qkv(h).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = proportional_attention(q, k, v, size, scale=attn.scale).transpose(1, 2).reshape(n, t, attn.num_heads * attn.head_dim)
    o = attn.norm(o)
    if gate is not None:
        o = o * gate
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(o))))
    x, size = _merge(x, size, k, r)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size


_BLOCK_FORWARD = {"open_clip": _open_clip_block, "timm": _timm_block}


class ToMeBlocks(nn.ModuleList):
    """The student's own blocks, run in turn with ToMe: x (B, N, D) -> (B, N', D), the sizes carried along."""

    def __init__(self, blocks, r: int, kind: str):
        super().__init__(blocks)
        self.r, self.kind = int(r), kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step, size = _BLOCK_FORWARD[self.kind], None
        for block in self:
            x, size = step(block, x, size, self.r)
        return x

    def extra_repr(self) -> str:
        return f"r={self.r}, kind={self.kind}"


class ToMeTransformer(nn.Module):
    """open_clip's Transformer of a VisionTransformer with ToMe: keeps the child name ``resblocks`` (and so the keys)."""

    def __init__(self, resblocks: ToMeBlocks):
        super().__init__()
        self.resblocks = resblocks

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("ToMe image towers take no attention mask")
        return self.resblocks(x)  # (B, N, D) -> (B, N', D)


# --------------------------------------------------------------------------------------------
# applying it to a student
# --------------------------------------------------------------------------------------------


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def _refuse(name: str, why: str) -> ConfigError:
    return ConfigError(f"--tome-r: student {name!r} {why}; ToMe takes open_clip or timm ViTs with a class token and "
                       "token pooling: drop --tome-r")


def _open_clip_parts(backbone: nn.Module, name: str) -> tuple[list[nn.Module], int]:
    if _qualname(backbone) != "open_clip.transformer.VisionTransformer":
        raise _refuse(name, f"has the image tower {type(backbone).__name__}, not open_clip's VisionTransformer")
    if getattr(backbone, "attn_pool", None) is not None or backbone.pool_type != "tok":
        raise _refuse(name, f"pools its tokens by {backbone.pool_type!r} / attention, not by the class token")
    blocks = list(backbone.transformer.resblocks)
    for block in blocks:
        attn = getattr(block, "attn", None)
        if (_qualname(block) != "open_clip.transformer.ResidualAttentionBlock" or not isinstance(attn, nn.MultiheadAttention)
                or not attn._qkv_same_embed_dim or attn.bias_k is not None):
            raise _refuse(name, f"has {type(block).__name__} blocks, not open_clip's default ResidualAttentionBlock")
    grid = backbone.grid_size
    return blocks, int(grid[0]) * int(grid[1]) + 1


def _timm_parts(backbone: nn.Module, name: str) -> tuple[list[nn.Module], int]:
    if _qualname(backbone) != "timm.models.vision_transformer.VisionTransformer":
        raise _refuse(name, f"is a timm {type(backbone).__name__}, not timm's VisionTransformer")
    if backbone.cls_token is None or backbone.num_prefix_tokens != 1:
        raise _refuse(name, f"has {backbone.num_prefix_tokens} prefix tokens, not one class token")
    if getattr(backbone, "attn_pool", None) is not None or backbone.global_pool != "token":
        raise _refuse(name, f"pools by {backbone.global_pool!r}, not by the class token")
    if not isinstance(backbone.blocks, nn.Sequential):
        raise _refuse(name, "runs its blocks in a way ToMe does not know")
    blocks = list(backbone.blocks)
    for block in blocks:
        if _qualname(block) != "timm.models.vision_transformer.Block" or _qualname(block.attn) != "timm.layers.attention.Attention":
            raise _refuse(name, f"has {type(block).__name__} / {type(block.attn).__name__} blocks, not timm's Block / Attention")
    return blocks, int(backbone.patch_embed.num_patches) + 1


def apply_tome(student: nn.Module, r: int) -> dict:
    """Merge r tokens per block in the ViT student `student` (a DualHeadStudent), in place -> the settings as a
    JSON-able dict (r, schedule, tokens per block, ...). r = 0 leaves the student untouched. A non-ViT student,
    or a ViT ToMe does not fit (see the module docstring), is a one-line ConfigError."""
    check_number("--tome-r", r, low=0, integer=True)
    r = int(r)
    args = student.build_args
    name, kind = args.get("name"), args.get("kind")
    backbone = student.backbone
    if isinstance(getattr(backbone, "transformer", None), ToMeTransformer) or isinstance(getattr(backbone, "blocks", None), ToMeBlocks):
        raise ConfigError(f"ToMe is already applied to student {name!r}; load the run again for another r")
    if kind == "open_clip":
        blocks, tokens = _open_clip_parts(backbone, name)
    elif kind == "timm":
        blocks, tokens = _timm_parts(backbone, name)
    else:
        raise _refuse(name, f"is a {kind} CNN, which has no tokens to merge")
    counts = token_schedule(tokens, len(blocks), r)
    if r > 0:
        merged = ToMeBlocks(blocks, r, kind)
        if kind == "open_clip":
            backbone.transformer = ToMeTransformer(merged)
        else:
            backbone.blocks = merged
    return {
        "r": r, "schedule": SCHEDULE, "proportional_attention": True, "merge": "between attention and MLP",
        "metric": "attention keys, mean over heads, cosine", "protected": "class token",
        "tokens_per_block": counts[:-1], "tokens_out": counts[-1],
    }
