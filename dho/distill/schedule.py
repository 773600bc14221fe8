"""The arithmetic of a run: steps per epoch, the learning-rate schedules, how often each cached view is drawn.

Pure functions, shared with the recipes (`pipelines/lowshot/recipe.py labeled-views`) and the demo.
An epoch is one pass over the unlabeled stream (`--epoch unlabeled`, every method) or over the shorter
of the two streams (`--epoch shorter`, the reference's zip of two loaders). Learning rate
(`--lr-schedule`): `warmup-cosine` is a linear warm-up to the base rate over the warm-up steps, then a
cosine to 0 at the last step (Table 6's wording); `reference` is the authors' ImageNet code (torch's
ChainedScheduler of LinearLR and CosineAnnealingLR, see `reference_lr_lambda`) with epochs of
ceil(stream / batch) steps as a DataLoader without drop_last; `linear` the authors' ten-dataset code
(transformers' linear warm-up and decay). docs/fidelity.md lists which the recipes take and why.

At start a run prints how often each cached (sample, view) will be drawn (`reuse_lines`) and warns past
REUSE_WARN: a labeled set drawn thousands of times through a few cached crops loses augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dho.distill.precheck import check_batch_split

REUSE_WARN = 10  # warn when a cached (sample, view) is drawn more often than this over the run


def lr_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to 0 at `total_steps` (`warmup-cosine`)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def reference_lr_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """The reference code's schedule (`reference`): ChainedScheduler(LinearLR(start_factor=0.01,
    total_iters=W), CosineAnnealingLR(T_max=total - W)), both stepped every iteration from step 0.

    That is L(t) * c(t) with L the linear warm-up factor and c(t) = (1 + cos(pi t / T_max)) / 2: the
    cosine starts at step 0, reaches 0 at step total - W and, being periodic, rises again over the
    last W steps (by 0.5 * (1 - cos(pi * W / (total - W))) of the base rate at most), as it did for
    the paper. Torch's chained (recursive) form restarts the cosine from the base rate one step after
    each zero, dropping the warm-up factor of that moment: L(t) * c(t) / L(r) after the last restart
    r, which only differs from L(t) * c(t) when the cosine reaches 0 before the warm-up ends.
    """
    def warm(t: int) -> float:
        return 0.01 + 0.99 * min(t, warmup_steps) / warmup_steps if warmup_steps > 0 else 1.0

    t_max = max(1, total_steps - warmup_steps)
    restart = t_max + 1 + ((step - t_max - 1) // (2 * t_max)) * 2 * t_max if step > t_max else None
    cosine = 0.5 * (1.0 + math.cos(math.pi * step / t_max))
    return warm(step) * cosine / (warm(restart) if restart is not None else 1.0)


def linear_lr_lambda(step: int, warmup_steps: float, total_steps: int) -> float:
    """The ten-dataset reference's schedule (`linear`): transformers' get_linear_schedule_with_warmup,
    a linear warm-up from 0 over `warmup_steps` (a float: 0.1 x total there), then linear to 0 at the end."""
    if step < warmup_steps:
        return step / max(1.0, warmup_steps)
    return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup_steps))


SCHEDULES = {"warmup-cosine": lr_lambda, "reference": reference_lr_lambda, "linear": linear_lr_lambda}


def schedule_steps(epoch_size: int, batch_size: int, epochs: int, lr_schedule: str) -> tuple[int, int]:
    """(steps per epoch, total steps): an epoch is one pass over a stream of `epoch_size` samples.

    `warmup-cosine` drops the ragged last batch (floor); the schedules of the reference code count it
    as its DataLoaders without drop_last do (ceil).
    """
    per_epoch = -(-epoch_size // batch_size) if lr_schedule in ("reference", "linear") else epoch_size // batch_size
    per_epoch = max(1, per_epoch)
    return per_epoch, epochs * per_epoch


def draws_per_sample(total_steps: int, batch_size: int, stream_size: int) -> float:
    """How often each sample of a stream of `stream_size` is drawn over `total_steps` steps of `batch_size`."""
    return total_steps * batch_size / max(1, stream_size)


def views_needed(total_steps: int, batch_size: int, stream_size: int, max_reuse: float) -> int:
    """Teacher views a stream's cache needs so that no (sample, view) is drawn more than `max_reuse` times."""
    return max(1, math.ceil(draws_per_sample(total_steps, batch_size, stream_size) / max_reuse - 1e-9))


@dataclass(frozen=True)
class Plan:
    """The steps of a run and how a step's batch is cut into micro-batches."""

    steps_per_epoch: int
    total_steps: int  # the schedule's length
    stop_step: int  # where this run stops (--max-steps)
    consumers: int  # ranks x workers, each yielding one micro-batch per forward
    micro: int  # samples per side, per consumer, per forward pass


def plan(cfg, size_l: int, size_u: int, world_size: int) -> Plan:
    """The run's plan from the stream sizes (valid samples; size_u = 0 without an unlabeled stream)."""
    epoch_size = size_u if size_u else size_l  # one pass over the unlabeled stream, for every method (ce too)
    if cfg.epoch == "shorter" and size_u:  # the reference's zip(labeled loader, unlabeled loader)
        epoch_size = min(size_l, size_u)
    consumers = check_batch_split(cfg.batch_size, world_size, cfg.workers, cfg.accum_steps)
    steps_per_epoch, total = schedule_steps(epoch_size, cfg.batch_size, cfg.epochs, cfg.lr_schedule)
    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    return Plan(steps_per_epoch, total, stop, consumers, cfg.batch_size // cfg.accum_steps // consumers)


def scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The --lr-schedule of `cfg` over `total_steps`, stepped once per optimiser step."""
    schedule = SCHEDULES[cfg.lr_schedule]
    warmup = cfg.warmup_steps if cfg.warmup_fraction is None else cfg.warmup_fraction * total_steps
    warmup = warmup if cfg.lr_schedule == "linear" else int(round(warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, warmup, total_steps))


def reuse_lines(streams: list[tuple[str, int, int]], total_steps: int, batch_size: int) -> list[str]:
    """For each (stream, samples, cached views): how often a sample and a (sample, view) are drawn over the run,
    and a warning where a (sample, view) repeats more than REUSE_WARN times."""
    lines = []
    for stream, size, views in streams:
        draws = draws_per_sample(total_steps, batch_size, size)
        per_view = draws / views
        lines.append(f"{stream} stream: {size} samples x {views} cached views; each sample is drawn ~{draws:.1f} times, "
                     f"each (sample, view) ~{per_view:.1f} times over the run")
        if per_view > REUSE_WARN:
            lines.append(f"warning: each {stream} (sample, view) is used ~{per_view:.0f} times (more than {REUSE_WARN}): the "
                         f"same few crops repeat instead of fresh augmentation; precompute that cache with --views "
                         f"{math.ceil(draws / REUSE_WARN)} or more")
    return lines
