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

from dho.distill.config import DistillConfig
from dho.distill.diagnostics import grad_diagnostics, plot_grad_diagnostics
from dho.distill.loop import distill
from dho.distill.objective import METHODS, OBJECTIVES, Objective, Trainee
from dho.distill.schedule import (REUSE_WARN, draws_per_sample, linear_lr_lambda, lr_lambda, reference_lr_lambda,
                                  schedule_steps, views_needed)

__all__ = ["DistillConfig", "distill", "METHODS", "OBJECTIVES", "Objective", "Trainee", "grad_diagnostics",
           "plot_grad_diagnostics", "REUSE_WARN", "draws_per_sample", "linear_lr_lambda", "lr_lambda",
           "reference_lr_lambda", "schedule_steps", "views_needed"]
