"""Stage 2, `dho distill`: train a dual-head student from datasets + teacher caches (Alg. 1).

    loop.py         distill(cfg): the set-up calls, then the step loop, top to bottom
    config.py       DistillConfig: every option, checked where it enters; the merge of run, file and command line
    objective.py    one record per --method: what it reads, trains, optimises (dho.losses) and predicts with
    streams.py      the datasets and caches, opened once; the batches on the device
    schedule.py     steps per epoch, learning-rate schedules, view-reuse arithmetic
    metrics.py      metrics.jsonl, TensorBoard / W&B, the console log
    diagnostics.py  the gradient-conflict diagnostics of Figs. 4 and 13

The names below are this package's public API (`from dho.distill import distill, DistillConfig`).
"""

import importlib

from dho.distill.config import DistillConfig

# name -> its module, imported on first use: the config alone (`dho distill --print-config`) needs no torch
_LAZY = {"distill": "loop", "METHODS": "objective", "OBJECTIVES": "objective", "Objective": "objective",
         "Trainee": "objective", "grad_diagnostics": "diagnostics", "plot_grad_diagnostics": "diagnostics",
         **{name: "schedule" for name in ("REUSE_WARN", "draws_per_sample", "linear_lr_lambda", "lr_lambda",
                                          "reference_lr_lambda", "schedule_steps", "views_needed")}}

__all__ = ["DistillConfig", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dho.distill' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dho.distill.{_LAZY[name]}"), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
