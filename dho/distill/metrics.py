"""What a run reports: metric records to RUN/metrics.jsonl and the --report-to sinks, its console log.

`Metrics.write(record)` appends a flat record ({"step": ..., "loss": ..., ...}) to metrics.jsonl, always,
and to TensorBoard / W&B under grouped names (`metric_name`: train/loss, val/combined_top1, grad/cosine_z)
as --report-to asks. `Metrics.say(text)` prints a line to stdout and appends it to RUN/log.txt. Only rank
0 reports; on other ranks both do nothing. On resume the records after the checkpoint's step (written by
the interrupted run, and coming again) are dropped first.

Out of scope: the metrics' meaning (the objective's loss terms, the validation of the loop).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Optional, Sequence

from dho.atomic import write_atomic
from dho.progress import format_time
from dho.run_dir import RunDir

TRAIN_METRICS = {"loss", "ce", "kd", "kd_labeled", "kd_unlabeled", "feature_kd", "lr", "samples_per_s", "epoch"}


def metric_name(key: str) -> Optional[str]:
    """The grouped name of a metrics.jsonl key in TensorBoard / W&B: train/loss, val/combined_top1,
    grad/cosine_z, ...; None for bookkeeping keys (step, final, best_epoch)."""
    if key in TRAIN_METRICS:
        return f"train/{key}"
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    if key == "best_val_top1":
        return "val/best_top1"
    if key.startswith(("grad_", "pred_inner", "eig_")):
        return "grad/" + key.removeprefix("grad_")
    return None


class Metrics:
    """The run's metric sinks and console log (see the module docstring)."""

    def __init__(self, run: RunDir, enabled: bool, resume_step: int | None = None, sinks: Sequence[str] = ("jsonl",),
                 config: Optional[dict] = None):
        self.enabled = enabled
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
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "dho"), name=run.path.name, dir=str(run.path),
                                    id=run.wandb_id.read_text().strip(), resume="allow", config=config or {})

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {metric_name(k): v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and metric_name(k)}
        step = int(record.get("step", 0))
        if self.tb is not None:
            for name, v in scalars.items():
                self.tb.add_scalar(name, v, step)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

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


def step_line(step: int, stop_step: int, steps_per_epoch: int, terms: dict, lr: float, rate: float, eta_s: float) -> str:
    """The log line of a logged step: progress, loss, learning rate, samples/s and the time left."""
    return (f"step {step}/{stop_step} epoch {step / steps_per_epoch:.2f} loss {terms['loss']:.4f} lr {lr:.3g} | "
            f"{rate:.1f} samples/s | ETA {format_time(eta_s)}")


def format_val(result: dict) -> str:
    """One line of a validation result: top-1 of each head and of Eq. 11."""
    return (f"top-1 ce_head {result['val_ce_head_top1']:.2f}, kd_head {result['val_kd_head_top1']:.2f}, "
            f"combined {result['val_combined_top1']:.2f}")
