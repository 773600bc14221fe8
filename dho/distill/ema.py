"""`dho distill --ema DECAY`: an exponential moving average of the student's weights (an extension, not the
paper's), as timm's `ModelEmaV3` keeps one and as apple/ml-dr's and timm's users train with.

After every optimiser step, each floating-point entry of the student's state (parameters and the BatchNorm
running mean and variance alike, timm ModelEmaV3's default) moves as ema <- decay * ema + (1 - decay) * w;
integer buffers (BatchNorm's num_batches_tracked) are copied. The EMA starts as a copy of the student as it
is built (pretrained weights, text-initialised heads), before the first step. `--ema-warmup` uses timm's
warm-up of the decay, min(decay, 1 - (1 + t)^(-2/3)) at update t = 1, 2, ... (gamma 1, power 2/3).
The EMA never feeds back into training: the raw weights of a run with --ema are those of the same run without.

Out of scope: an EMA kept on another device than the student's (timm's --model-ema-force-cpu).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

WARMUP_POWER = 2 / 3  # timm ModelEmaV3's warmup_power (and warmup_gamma 1)


def ema_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update number `updates` (1-based): `decay`, or with warm-up min(decay, 1 - (1 + t)^(-2/3))."""
    return min(decay, 1.0 - (1.0 + updates) ** -WARMUP_POWER) if warmup else decay


@torch.no_grad()
def ema_update_(ema_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor], decay: float) -> None:
    """In place: ema <- decay * ema + (1 - decay) * w for every floating-point entry, w copied for the others."""
    for name, e in ema_state.items():
        w = state[name]
        if e.is_floating_point():
            e.lerp_(w.to(e.dtype), 1.0 - decay)
        else:
            e.copy_(w)


class StudentEma:
    """The EMA copy of a student (eval mode, no gradients) and its number of updates."""

    def __init__(self, student: nn.Module, decay: float, warmup: bool = False):
        self.module = copy.deepcopy(student).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def update(self, student: nn.Module) -> None:
        self.updates += 1
        ema_update_(self.module.state_dict(), student.state_dict(), ema_decay(self.decay, self.updates, self.warmup))

    def state(self) -> dict:
        """What a checkpoint keeps: the EMA's tensors and its update count."""
        return {"state_dict": self.module.state_dict(), "updates": self.updates}

    def load(self, state: dict) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.updates = int(state["updates"])
