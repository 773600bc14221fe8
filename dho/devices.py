"""The one place that turns `--device` into a torch.device, for every command.

    auto     cuda if a GPU is visible, else cpu
    cpu      the CPU
    cuda     the GPU of this process: cuda:LOCAL_RANK under torchrun, else cuda:0
    cuda:N   GPU N (one process only: under torchrun every rank takes its own LOCAL_RANK)

Anything else, a GPU that is not visible, or an index past the visible GPUs is a ConfigError with
the allowed values. Out of scope: MPS, XLA and other accelerators.
"""

from __future__ import annotations

import os
import re

import torch

from dho.errors import ConfigError

DEVICE_HELP = "auto (cuda if available), cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device) -> torch.device:
    """`--device` -> torch.device of this process (see the module docstring)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = str(spec).strip().lower()
    match = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", spec)
    if match is None:
        raise ConfigError(f"--device must be {DEVICE_HELP}; got {spec!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec} was asked for but no CUDA device is visible; use --device cpu or auto")
    if match.group(1) is None:  # auto or cuda
        return torch.device("cuda", local_rank if world > 1 else 0)
    index = int(match.group(1))
    if world > 1:
        raise ConfigError(f"--device {spec} under torchrun would put every rank on one GPU; use --device cuda "
                          "(each rank takes cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0 .. "
                          f"cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)
