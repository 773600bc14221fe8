"""A deployable TorchScript model of a finished run: loads with plain ``torch.jit.load``.

    probs = model(x)    # x: (B, 3, S, S) float, RGB, normalised; probs: (B, C), Eq. 11

alpha and beta (the run's, see ``dho.evaluate.run_alpha_beta``) are baked in. Metadata rides
along as the extra file ``dho.json``: class names, preprocessing (image_size, interpolation,
mean, std, resize_mode and the crop recipe in words), alpha, beta, student name, dho version.
Read it without dho:

    extra = {"dho.json": ""}
    model = torch.jit.load("model.ts", _extra_files=extra)
    meta = json.loads(extra["dho.json"])

TorchScript is deprecated in recent torch (a warning on load) but still loads everywhere without
the model's Python code; a ``torch.export`` (.pt2) variant is the successor format.

Out of scope: ONNX, quantisation, dynamic image sizes (the traced model expects S x S).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

import dho
from dho.atomic import remove_stale, temp_sibling
from dho.errors import ConfigError, DhoError
from dho.evaluate import load_run, run_alpha_beta
from dho.students import DualHeadStudent

META_FILE = "dho.json"
VIEW_RECIPE = (
    "open_clip's eval transform: shortest: torchvision Resize(image_size) (the short side, PIL, the "
    "interpolation), then CenterCrop(image_size); squash: Resize((image_size, image_size)); longest: "
    "resize the long side to image_size keeping the ratio, then center-crop-or-pad with black. Then "
    "scale to [0, 1], subtract mean and divide by std per channel."
)


class DeployableDHO(nn.Module):
    """Student + Eq. 11 with fixed alpha, beta: normalised images (B, 3, S, S) -> probs (B, C)."""

    def __init__(self, student: DualHeadStudent, alpha: float, beta: float):
        super().__init__()
        self.backbone = student.backbone
        self.ce_head = student.ce_head
        self.kd_head = student.kd_head
        self.alpha = float(alpha)
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.backbone(x)  # (B, D)
        p_ce = torch.softmax(self.ce_head(z).float(), dim=-1)  # (B, C)
        p_kd = torch.softmax(self.kd_head(z).float() / self.beta, dim=-1)  # (B, C)
        return self.alpha * p_ce + (1.0 - self.alpha) * p_kd  # (B, C)


def export(run_dir: Union[str, Path], out: Union[str, Path]) -> Path:
    """Trace RUN_DIR/model.pt (with the run's alpha, beta) into a TorchScript file at `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give the file to write, e.g. {out / 'model.ts'}")
    student, meta = load_run(run_dir, "cpu")
    alpha, beta, source = run_alpha_beta(run_dir, meta)
    wrapper = DeployableDHO(student, alpha, beta).eval()
    size = int(meta["preprocess"]["image_size"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings():
        # recent torch deprecates TorchScript in favour of torch.export; it is still the one format
        # that loads with plain torch.jit.load on every torch this project supports (>= 2.1)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        traced = torch.jit.trace(wrapper, torch.randn(2, 3, size, size, generator=gen))
        # the traced graph must not have frozen the batch size of the example
        check = torch.randn(3, 3, size, size, generator=gen)
        diff = (traced(check) - wrapper(check)).abs().max().item()
    if not diff < 1e-4:
        raise DhoError(f"the traced model of {run_dir} differs from the eager one by {diff:.3g} on a new batch size; "
                       f"student {meta['build_args']['name']!r} cannot be exported with torch.jit.trace")
    info = {
        "format": "dho-export", "version": 1, "dho_version": dho.__version__,
        "student": meta["build_args"]["name"], "num_classes": len(meta["classnames"]),
        "classnames": meta["classnames"], "alpha": alpha, "beta": beta, "alpha_beta_source": source,
        "preprocess": meta["preprocess"], "view": VIEW_RECIPE,
        "input": "float32 (B, 3, image_size, image_size), RGB, normalised",
        "output": "probabilities (B, C) = alpha * softmax(ce_head) + (1 - alpha) * softmax(kd_head / beta)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # files of exports that were killed while writing
    tmp = temp_sibling(out, "tmp")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        torch.jit.save(traced, str(tmp), _extra_files={META_FILE: json.dumps(info)})
    os.replace(tmp, out)
    return out
