"""PromptSRC's Gaussian prompt aggregation (GPA, Khattak et al. 2023 §3.2.2) for `dho distill --promptsrc-tokens`.

At the end of epoch e (1-based) every trained parameter P of the student adds w_e * P to a running sum, with the
weights of `dho.losses.gpa_weights` (a Gaussian over the epochs, normalised to sum 1), as PromptSRC's trainer sums
the weighted state dicts. When the run's last epoch has ended, the sum replaces those parameters before model.pt is
written (PromptSRC loads its GPA model for the final inference). The frozen parameters are not summed (PromptSRC's
state-dict sum gives them back up to rounding). The sum and the number of epochs in it live in the checkpoint, so a
resumed run aggregates exactly what the uninterrupted one does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dho.losses import gpa_weights


class Gpa:
    """The running sum_e w_e P_e of the student's trained parameters."""

    def __init__(self, student: nn.Module, epochs: int):
        self.names = [n for n, p in student.named_parameters() if p.requires_grad]
        self.device = next(student.parameters()).device  # where the sums live (the student's device)
        self.weights = gpa_weights(int(epochs))
        self.sums: dict[str, torch.Tensor] = {}
        self.epochs_added = 0

    @torch.no_grad()
    def add(self, student: nn.Module) -> None:
        """The end of the next epoch: sum += w_e * P for every trained parameter (a no-op past the last epoch)."""
        if self.epochs_added >= len(self.weights):
            return
        w = self.weights[self.epochs_added]
        params = dict(student.named_parameters())
        for name in self.names:
            weighted = params[name].detach() * w
            self.sums[name] = weighted.clone() if name not in self.sums else self.sums[name] + weighted
        self.epochs_added += 1

    @property
    def complete(self) -> bool:
        return self.epochs_added == len(self.weights)

    @torch.no_grad()
    def finish(self, student: nn.Module) -> str:
        """After the last step: the aggregate replaces the trained parameters if every epoch is in it -> a log line."""
        if not self.complete:
            return (f"GPA: {self.epochs_added} of {len(self.weights)} epochs aggregated (the run stopped early); model.pt "
                    "holds the last weights")
        params = dict(student.named_parameters())
        for name in self.names:
            params[name].copy_(self.sums[name])
        return f"GPA: model.pt holds the Gaussian-weighted aggregate of the {len(self.weights)} epochs' prompts and heads"

    def state(self) -> dict:
        return {"sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()}, "epochs_added": self.epochs_added}

    def load(self, state: dict) -> None:
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.epochs_added = int(state["epochs_added"])
