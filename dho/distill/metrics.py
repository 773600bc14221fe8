"""What a run reports: metric records to RUN/metrics.jsonl and the --report-to sinks, its console log,
the per-epoch RUN/summary.csv.

`Metrics.write(record)` appends a flat record ({"step": ..., "loss": ..., ...}) to metrics.jsonl, always,
and to TensorBoard / W&B under grouped names (`metric_name`: train/loss, val/combined_top1, grad/cosine_z)
as --report-to asks; the final validation (a record with "final": true) goes there as final/combined_top1,
..., its own series beside the per-epoch val/... at the same step. `Metrics.say(text)` prints a line to
stdout and appends it to RUN/log.txt. `Metrics.summary(rows)` rewrites RUN/summary.csv (one row per epoch:
epoch, step, lr, the epoch's mean loss terms, its validation top-1 per head), whole or not at all. Only
rank 0 reports; on other ranks all three do nothing. On resume the records after the checkpoint's step
(written by the interrupted run, and coming again) are dropped first, and summary.csv keeps its rows up to
that step (`resume_summary`).

`EpochTerms` sums one epoch's loss terms on the device (no host sync per step) for the summary's means;
its state travels in the checkpoint, so a resumed epoch has the same means as an uninterrupted one.

Out of scope: the metrics' meaning (the objective's loss terms, the validation of the loop).
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from pathlib import Path
from typing import Optional, Sequence

from dho.atomic import write_atomic
from dho.progress import format_time
from dho.run_dir import RunDir

LOSS_TERMS = ("loss", "ce", "kd", "kd_labeled", "kd_unlabeled", "feature_kd")  # the objectives' named terms, in print order
TRAIN_METRICS = {*LOSS_TERMS, "lr", "samples_per_s", "epoch", "data_wait_s", "peak_memory_gib"}


def metric_name(key: str, final: bool = False) -> Optional[str]:
    """The grouped name of a metrics.jsonl key in TensorBoard / W&B: train/loss, val/combined_top1,
    grad/cosine_z, ...; a final record's validation keys as final/combined_top1, ...; None for
    bookkeeping keys (step, final, best_epoch)."""
    if key in TRAIN_METRICS:
        return f"train/{key}"
    if key.startswith("val_"):
        return f"{'final' if final else 'val'}/{key[4:]}"
    if key == "best_val_top1":
        return "val/best_top1"
    if key.startswith(("grad_", "pred_inner", "eig_")):
        return "grad/" + key.removeprefix("grad_")
    return None


class Metrics:
    """The run's metric sinks and console log (see the module docstring)."""

    def __init__(self, run: RunDir, enabled: bool, resume_step: int | None = None, sinks: Sequence[str] = ("jsonl",),
                 config: Optional[dict] = None, wandb_name: Optional[str] = None, wandb_group: Optional[str] = None,
                 wandb_tags: Sequence[str] = ()):
        self.enabled = enabled
        self.summary_path = run.summary
        if enabled and resume_step is not None and run.metrics.exists():
            # records after the checkpoint were written by the interrupted run and come again: drop them
            kept = [line for line in run.metrics.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_atomic(run.metrics, lambda part: part.write_text("".join(line + "\n" for line in kept)))
        self.file = open(run.metrics, "a") if enabled else None
        self.text = open(run.log, "a") if enabled else None  # the console output, appended on resume
        self.tb = self.wandb = None
        if enabled and "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.tensorboard))
        if enabled and "wandb" in sinks:
            import wandb

            if not run.wandb_id.is_file():  # one W&B run per dho run, continued on --resume
                write_atomic(run.wandb_id, lambda part: part.write_text(uuid.uuid4().hex[:12] + "\n"))
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "dho"), name=wandb_name or run.path.name,
                                    group=wandb_group, tags=list(wandb_tags) or None, dir=str(run.path),
                                    id=run.wandb_id.read_text().strip(), resume="allow", config=config or {})

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        final = bool(record.get("final"))
        scalars = {metric_name(k, final): v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and metric_name(k, final)}
        step = int(record.get("step", 0))
        if self.tb is not None:
            for name, v in scalars.items():
                self.tb.add_scalar(name, v, step)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

    def summary(self, rows: Sequence[dict]) -> None:
        """RUN/summary.csv of these rows (one per epoch), rewritten whole (`write_summary`)."""
        if self.enabled:
            write_summary(self.summary_path, rows)

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)
            self.text.write(text + "\n")
            self.text.flush()

    def close(self) -> None:
        for f in (self.file, self.text):
            if f:
                f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def step_line(step: int, stop_step: int, steps_per_epoch: int, terms: dict, lr: float, rate: float, eta_s: float,
              data_wait_s: Optional[float] = None, interval_s: Optional[float] = None,
              peak_memory_gib: Optional[float] = None) -> str:
    """The log line of a logged step: progress, the loss and its terms (ce, kd and KD's labeled / unlabeled halves,
    feature_kd: whichever the method has), learning rate, the time spent waiting for data since the previous line
    (and its share of that interval), the peak CUDA memory, samples/s and the time left."""
    loss = f"loss {terms['loss']:.4f}"
    for name in ("ce", "kd", "feature_kd"):
        if name in terms:
            loss += f" {name} {terms[name]:.4f}"
    if "kd_labeled" in terms and "kd_unlabeled" in terms:
        loss += f" (labeled {terms['kd_labeled']:.4f} + unlabeled {terms['kd_unlabeled']:.4f})"
    speed = ""
    if data_wait_s is not None:
        share = f" ({100 * data_wait_s / interval_s:.0f}%)" if interval_s else ""
        speed += f" | data wait {data_wait_s:.2f} s{share}"
    if peak_memory_gib is not None:
        speed += f" | peak memory {peak_memory_gib:.2f} GiB"
    return (f"step {step}/{stop_step} epoch {step / steps_per_epoch:.2f} {loss} lr {lr:.3g}{speed} | "
            f"{rate:.1f} samples/s | ETA {format_time(eta_s)}")


def format_val(result: dict) -> str:
    """One line of a validation result: top-1 of each head and of Eq. 11."""
    return (f"top-1 ce_head {result['val_ce_head_top1']:.2f}, kd_head {result['val_kd_head_top1']:.2f}, "
            f"combined {result['val_combined_top1']:.2f}")


# ---------------------------------------------------------------------------------------------- summary.csv


class EpochTerms:
    """The loss terms of the current epoch summed on the device (float64, one add per step and term, no host
    sync) -> their means at the epoch's end. `state()` / `load()` carry the sums in the checkpoint."""

    def __init__(self):
        self.sums: dict = {}  # term -> 0-dim float64 tensor on the training device
        self.steps = 0

    def add(self, terms: dict) -> None:
        for k, v in terms.items():
            v = v.detach().double()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1

    def means(self) -> dict[str, float]:
        import torch

        if not self.sums:
            return {}
        keys = list(self.sums)
        values = (torch.stack([self.sums[k] for k in keys]) / max(self.steps, 1)).tolist()  # one host sync
        return dict(zip(keys, values))

    def average_over_ranks(self, world_size: int) -> None:
        """Every rank's sums replaced by their mean over the ranks (one all-reduce, at the steps every rank saves):
        the checkpoint (rank 0's) then holds what every rank holds, and the epoch's means are over all ranks."""
        import torch

        if world_size == 1 or not self.sums:
            return
        keys = sorted(self.sums)
        t = torch.stack([self.sums[k] for k in keys])
        torch.distributed.all_reduce(t)
        self.sums = dict(zip(keys, t / world_size))

    def reset(self) -> None:
        self.sums, self.steps = {}, 0

    def state(self) -> dict:
        return {"steps": self.steps, "sums": {k: v.detach().cpu() for k, v in self.sums.items()}}

    def load(self, state: Optional[dict], device) -> None:
        state = state or {"steps": 0, "sums": {}}
        self.steps = int(state["steps"])
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}


SUMMARY_FIRST = ("epoch", "step", "lr", *LOSS_TERMS)  # summary.csv's leading columns; validation columns follow


def write_summary(path: Path, rows: Sequence[dict]) -> None:
    """summary.csv of `rows` ({epoch, step, lr, mean loss terms, val_... top-1}), one per epoch in order; the columns
    are the rows' keys (leading ones first), a value a row lacks is empty. Written whole or not at all."""
    keys = list(dict.fromkeys([k for k in SUMMARY_FIRST if any(k in r for r in rows)]
                              + [k for r in rows for k in r if k not in SUMMARY_FIRST]))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in keys})
    write_atomic(Path(path), lambda part: part.write_text(text.getvalue()))


def read_summary(path: Path) -> list[dict]:
    """The rows of a summary.csv (numbers as int / float, empty cells left out); [] if there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for raw in csv.DictReader(io.StringIO(path.read_text())):
        row = {}
        for k, v in raw.items():
            if v not in ("", None):
                row[k] = int(v) if k in ("epoch", "step") else float(v)
        rows.append(row)
    return rows


def resume_summary(path: Path, checkpoint_rows: Sequence[dict], resume_step: int) -> list[dict]:
    """The summary rows a run resumed at `resume_step` continues from: the file's rows up to that step (a later one
    was written by the interrupted run and comes again; the file's also hold the validation after the checkpoint),
    and the checkpoint's rows the file lacks (a run killed between its epoch-end checkpoint and the file)."""
    kept = {r["epoch"]: r for r in read_summary(path) if r.get("step", 0) <= resume_step}
    for row in checkpoint_rows:
        kept.setdefault(row["epoch"], dict(row))
    return [kept[e] for e in sorted(kept)]
