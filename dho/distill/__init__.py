"""Stage 2, `dho distill`: train a dual-head student from datasets + teacher caches (Alg. 1).

    loop.py         distill(cfg): the set-up calls, then the step loop, top to bottom
    config.py       DistillConfig: every option, checked where it enters; the merge of run, file and command line
    precheck.py     the checks that need only manifests, cache attributes and the config (run before torch loads)
    objective.py    one record per --method: what it reads, trains, optimises (dho.losses) and predicts with
    streams.py      the datasets and caches, opened once; the batches on the device
    schedule.py     steps per epoch, learning-rate schedules, view-reuse arithmetic
    metrics.py      metrics.jsonl, TensorBoard / W&B, the console log
    diagnostics.py  the gradient-conflict diagnostics of Figs. 4 and 13

The names below are this package's public API (`from dho.distill import distill, DistillConfig`). They are
loaded on first use (PEP 562), so `dho.distill.config` and `dho.distill.precheck` import without torch: the CLI
builds and checks the config before torch loads (precheck.py).
"""

from __future__ import annotations

import importlib

_HOMES = {  # public name -> the module that defines it
    "DistillConfig": "config", "distill": "loop", "METHODS": "objective", "OBJECTIVES": "objective",
    "Objective": "objective", "Trainee": "objective", "grad_diagnostics": "diagnostics",
    "plot_grad_diagnostics": "diagnostics", "REUSE_WARN": "schedule", "draws_per_sample": "schedule",
    "linear_lr_lambda": "schedule", "lr_lambda": "schedule", "reference_lr_lambda": "schedule",
    "schedule_steps": "schedule", "views_needed": "schedule",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
