"""`dho distill --grad-surgery pcgrad`: PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning",
Alg. 1) between the two loss terms of a method, as the authors' `train_imgnet_pc_grad.py` runs it on SHO (CE+KD).

The two terms (lambda * L_CE and (1 - lambda) * L_KD, `Objective.tasks`) are differentiated apart; their
gradients, flattened over every trained parameter (backbone and head together, as the reference's PCGrad wraps
the optimiser of `student_model.parameters()`), are summed over the step's micro-batches (and averaged over the
ranks), then `pcgrad` projects each off the other when they conflict and merges them into the `.grad` the
optimiser, the gradient scaler and --grad-clip see. See docs/fidelity.md for each choice.

Out of scope: more than two terms (Alg. 1's random task order matters only from three on).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def pcgrad(g_1: Tensor, g_2: Tensor, shared: Tensor) -> Tensor:
    """PCGrad's update of two task gradients (P,) flattened over the trained parameters (Alg. 1, two tasks):
    if g_1 . g_2 < 0, g_1' = g_1 - (g_1 . g_2) / |g_2|^2 g_2 and g_2' = g_2 - (g_1 . g_2) / |g_1|^2 g_1, each
    projected against the other's original gradient; else g_i' = g_i. Merged as the reference's PCGrad does: the
    mean (g_1' + g_2') / 2 where `shared` (P,) bool says both tasks reach the parameter, the sum elsewhere."""
    g_1, g_2 = g_1.float(), g_2.float()
    dot = torch.dot(g_1, g_2)  # () no host sync: the condition stays on the device
    conflict = dot < 0
    p_1 = torch.where(conflict, g_1 - dot / g_2.pow(2).sum() * g_2, g_1)  # (P,)
    p_2 = torch.where(conflict, g_2 - dot / g_1.pow(2).sum() * g_1, g_2)  # (P,)
    return torch.where(shared, (p_1 + p_2) / 2, p_1 + p_2)


class TaskGrads:
    """The two terms' gradients of one optimiser step, summed over its micro-batches, then projected once."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.sums: list[list[Optional[Tensor]]] = [[None] * len(self.params) for _ in range(2)]

    def add(self, parts: Sequence[Tensor]) -> None:
        """Differentiate each of the two (scaled) terms of one micro-batch, the graph kept for the second."""
        for i, part in enumerate(parts):
            grads = torch.autograd.grad(part, self.params, retain_graph=i == 0, allow_unused=True)
            self.sums[i] = [g if s is None else (s if g is None else s + g) for s, g in zip(self.sums[i], grads)]

    def apply_(self, world_size: int = 1) -> None:
        """Write pcgrad's merge of the summed gradients into the parameters' .grad (None where neither term reaches
        a parameter, as backward leaves it) and start the next step's sums."""
        reached = [[g is not None for g in sums] for sums in self.sums]
        flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(sums, self.params)])
                for sums in self.sums]  # 2 x (P,)
        if world_size > 1:  # as DistributedDataParallel: the mean gradient of the ranks, before the projection
            for g in flat:
                torch.distributed.all_reduce(g)
                g.div_(world_size)
        shared = torch.cat([torch.full((p.numel(),), a and b, device=p.device)
                            for p, a, b in zip(self.params, *reached)])  # (P,) bool
        merged = pcgrad(flat[0], flat[1], shared)
        offset = 0
        for p, a, b in zip(self.params, *reached):
            n = p.numel()
            p.grad = merged[offset:offset + n].view_as(p).to(p.dtype) if (a or b) else None
            offset += n
        self.sums = [[None] * len(self.params) for _ in range(2)]
