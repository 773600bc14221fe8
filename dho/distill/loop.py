"""Stage 2: train a dual-head student from datasets + teacher caches (Alg. 1). The teacher is never loaded.

`distill(cfg)` reads top to bottom: set-up calls (the method's record, devices and ranks, the data opened
once, the step plan, the run folder, the model and optimiser, a resumed state, the batches, the
metrics), then `_train`, the loop over steps, then the end (the model file, validation, plots). Each step
takes a labeled and an unlabeled mini-batch of equal size (1:1, the unlabeled one drawn from labeled ∪
unlabeled, Alg. 1 line 7), computes the method's loss (dho/distill/objective.py, dho/losses.py) and
updates g and the heads the method trains. The loop asks the method's `Objective` record what to read,
train, log and keep; it never branches on the method's name.

Loss finiteness is checked a few steps late, in one host sync, so the CPU can queue the next step while
the GPU runs this one; it is always checked before logging or saving, and the error names the first
bad step (the weights after it are never saved). SIGTERM/SIGINT/SIGUSR1 stop at the end of a step with a
checkpoint (exit status 3 in the CLI); `dho distill --resume RUN` continues bit-identically.

Out of scope: mixed teacher caches within one stream, teachers in the loop (the cache replaces them).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from dho import evaluate
from dho.devices import Ranks, any_rank, cpu_threads_beside_workers, mean_over_ranks, resolve_device, setup_ranks, torchrun_env
from dho.distill import schedule
from dho.distill.config import DistillConfig, check_resume, report_sinks
from dho.distill.diagnostics import grad_diagnostics, plot_grad_diagnostics
from dho.distill.ema import StudentEma
from dho.distill.gpa import Gpa
from dho.distill.metrics import EpochTerms, Metrics, format_val, resume_summary, step_line
from dho.distill.objective import OBJECTIVES, Objective, Trainee, build_trainee
from dho.distill.streams import DeviceBatches, Streams, make_loader, open_streams
from dho.distill.surgery import TaskGrads
from dho.errors import ConfigError, DhoError, Interrupted
from dho.interrupt import StopSignal, workers_gone
from dho.progress import Progress
from dho.run_dir import RunDir, rng_state, set_rng_state

# Test-only: seconds to sleep after each step, so a test can SIGKILL a run mid-way.
_TEST_STEP_SLEEP = float(os.environ.get("DHO_TEST_STEP_SLEEP", "0"))
VAL_BATCH_SIZE = 256  # images per forward when scoring --val


@dataclass
class Training:
    """What the step loop works with, built by `distill`'s set-up calls."""

    cfg: DistillConfig
    objective: Objective
    ranks: Ranks
    plan: schedule.Plan
    run: RunDir
    streams: Streams
    model: Trainee
    params: list  # the parameters that train (the optimiser's, in its order)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast_dtype: Optional[torch.dtype]
    val: Optional[tuple] = None  # (dataset, class columns or None): --val, opened once
    start_step: int = 0
    grad_diag: list = field(default_factory=list)  # the --log-grad-cosine records (kept in the checkpoint)
    best: dict = field(default_factory=lambda: {"top1": -1.0, "epoch": None, "step": None})  # the best epoch on --val so far
    ddp: Optional[nn.Module] = None  # the model as the step calls it (DistributedDataParallel under torchrun)
    step_fn: Optional[Callable] = None  # batch -> loss terms (torch.compile'd with --compile)
    batches: Optional[DeviceBatches] = None
    log: Optional[Metrics] = None
    epoch_terms: EpochTerms = field(default_factory=EpochTerms)  # this epoch's loss terms summed (summary.csv's means)
    summary: list = field(default_factory=list)  # summary.csv's rows so far, one per epoch (kept in the checkpoint)
    task_grads: Optional[TaskGrads] = None  # --grad-surgery: the two loss terms' gradients of the step
    ema: Optional[StudentEma] = None  # --ema: the moving average of the student's weights (kept in the checkpoint)
    dropout: bool = False  # an mlp head with --head-dropout > 0: its masks come from `_step_rng`
    gpa: Optional[Gpa] = None  # --promptsrc-tokens: the Gaussian-weighted sum of the epochs' weights (in the checkpoint)

    @property
    def student(self) -> nn.Module:
        return self.model.student

    @property
    def reported(self) -> nn.Module:
        """The model the run validates, keeps and saves as model.pt: the EMA with --ema, else the student."""
        return self.ema.module if self.ema is not None else self.student

    def autocast(self):
        device = self.ranks.device
        return torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def alpha_beta(self) -> tuple[float, float]:
        """Eq. 11's mix stored with this method's model."""
        return self.objective.alpha_beta or (self.cfg.alpha, self.cfg.beta)


def distill(cfg: DistillConfig, resume: bool | str = False) -> Path:
    """Train the student of `cfg` and write its run folder (config.json, metrics.jsonl, checkpoints/, model.pt).

    resume: False (a new run), True (continue cfg.out's checkpoint) or "auto" (continue it if there is one, else
    start; a run finished with these options is left as it is: the command of a requeued job, `--resume auto`)."""
    if resume not in (False, True, "auto"):
        raise ConfigError(f"resume must be False, True or 'auto'; got {resume!r}")
    if resume == "auto" and _finished_already(RunDir(cfg.out), cfg):
        return Path(cfg.out)
    objective = OBJECTIVES[cfg.method]
    device = resolve_device(cfg.device)
    if cfg.sync_bn and torchrun_env()[1] > 1 and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); drop it on CPU")
    ranks = setup_ranks(device)  # cuda:LOCAL_RANK under torchrun
    autocast_dtype = _autocast_dtype(cfg.precision, device)
    _check_decode(cfg.decode, device)
    cpu_threads_beside_workers(device, cfg.workers, ranks.world_size)

    streams = open_streams(cfg, objective)  # every dataset and cache opened once, checked against each other
    plan = schedule.plan(cfg, streams.size_l, streams.size_u, ranks.world_size)
    val = evaluate.open_labeled(cfg.val, streams.classnames, "--val") if cfg.val is not None else None
    run = RunDir(cfg.out)
    with run.held(ranks.is_main):  # one dho distill per --out, for the whole run
        resume, note = _start_run_dir(run, cfg, resume, ranks)
        t = _setup_model(cfg, objective, ranks, plan, run, streams, autocast_dtype)
        t.val = val
        if resume:
            _restore(t)
        _setup_parallel(t)
        t.batches = DeviceBatches(
            make_loader(streams, objective, cfg, rank=ranks.rank, world_size=ranks.world_size, micro=plan.micro,
                        start_step=t.start_step, image_size=t.student.preprocess.image_size,
                        interpolation=t.student.preprocess.interpolation, pin_memory=device.type == "cuda"),
            max(cfg.workers, 1), device, len(streams.classnames), t.student.preprocess, _memory_format(t.student, device))
        t.log = Metrics(run, enabled=ranks.is_main, resume_step=t.start_step if resume else None,
                        sinks=report_sinks(cfg.report_to), config=cfg.to_dict(), wandb_name=cfg.run_name,
                        wandb_group=cfg.group, wandb_tags=cfg.tag_list())
        if resume:
            t.summary = resume_summary(run.summary, t.summary, t.start_step)
            t.log.summary(t.summary)
        _say_plan(t, note, resume)

        with StopSignal() as stop:
            step = _train(t, stop)
        _finish(t, step)
    return run.path


# ---------------------------------------------------------------------------------------------- set-up


def _check_decode(decode: str, device: torch.device) -> None:
    """--decode gpu decodes with nvJPEG on the training device, so it needs a CUDA one."""
    if decode == "gpu" and device.type != "cuda":
        raise ConfigError(f"--decode gpu needs a CUDA device (this run trains on {device}); use --decode cpu")


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]  # checked by DistillConfig


def _memory_format(student: nn.Module, device: torch.device) -> Optional[torch.memory_format]:
    """channels_last for convolutional students on CUDA; None (as built) otherwise."""
    return torch.channels_last if device.type == "cuda" and student.channels_last else None


def _finished_already(run: RunDir, cfg: DistillConfig) -> bool:
    """--resume auto on a finished run: its options are checked as on a resume; made with the same --max-steps it is
    done, said in one line, and nothing is touched (a new --max-steps continues it as --resume does)."""
    if not run.finished():
        return False
    stored = DistillConfig.load(run.config)
    check_resume(stored, cfg, run.path, auto=True)
    if stored.max_steps != cfg.max_steps:
        return False
    if torchrun_env()[0] == 0:
        print(f"{run.path} holds the finished run ({run.model}); nothing to do (`dho distill --resume {run.path}` "
              "reruns its end)", flush=True)
    return True


def _start_run_dir(run: RunDir, cfg: DistillConfig, resume: bool | str, ranks: Ranks) -> tuple[bool, str]:
    """Every rank reads the folder's old state (start or resume, and the options a resume may not change)
    before rank 0 writes the new one -> (resume?, note for the log)."""
    auto = resume == "auto"
    resume, note = run.start(resume)
    if resume:
        check_resume(DistillConfig.load(run.config), cfg, run.path, auto=auto)
    if ranks.world_size > 1:
        torch.distributed.barrier()
    if ranks.is_main:
        run.create(cfg.to_dict(), resume, cfg.to_yaml())
    if ranks.world_size > 1:
        torch.distributed.barrier()
    return resume, note


def _setup_model(cfg: DistillConfig, objective: Objective, ranks: Ranks, plan: schedule.Plan, run: RunDir,
                 streams: Streams, autocast_dtype: Optional[torch.dtype]) -> Training:
    """The student (seeded: every rank and every resume builds the same one), the heads the method trains,
    AdamW (fused on CUDA), the schedule and the fp16 gradient scaler."""
    from dho.students import MLPHead, build_student

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    student = build_student(
        cfg.student, len(streams.classnames), pretrained=cfg.student_pretrained, classnames=streams.classnames,
        templates=streams.templates, init_heads_from_text=cfg.init_heads_from_text, align_kd_head=cfg.align_kd_head,
        text_init_heads=cfg.text_init_heads, zeta=cfg.zeta, vlm_heads=cfg.vlm_heads, interpolation=cfg.interpolation,
        ce_head=cfg.ce_head, kd_head=cfg.kd_head, head_hidden=cfg.head_hidden, head_dropout=cfg.head_dropout,
        vpt_tokens=cfg.vpt_tokens, vpt_depth=cfg.vpt_depth, coop_context=cfg.coop_context,
        promptsrc_tokens=cfg.promptsrc_tokens, promptsrc_depth=cfg.promptsrc_depth,
        device=ranks.device if cfg.promptsrc_tokens else "cpu",  # PromptSRC's C x 60 frozen text features: on the device
    )
    device = ranks.device
    weight = None if streams.teacher_logit_weight is None else torch.from_numpy(streams.teacher_logit_weight)
    model = build_trainee(objective, student, streams.embed_dim, weight, cfg.freeze_backbone).to(device)
    memory_format = _memory_format(student, device)
    if memory_format is not None:  # CNN students on CUDA: NHWC convolutions (tensor cores without transposes)
        model = model.to(memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    return Training(cfg, objective, ranks, plan, run, streams, model, params, optimizer,
                    schedule.scheduler(optimizer, cfg, plan.total_steps),
                    torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16), autocast_dtype,
                    task_grads=TaskGrads(params) if cfg.grad_surgery == "pcgrad" else None,
                    ema=StudentEma(model.student, cfg.ema, cfg.ema_warmup) if cfg.ema is not None else None,
                    dropout=any(isinstance(m, MLPHead) and m.drop.p > 0 for m in student.modules()),
                    gpa=Gpa(student, cfg.epochs) if cfg.promptsrc_tokens else None)


def _restore(t: Training) -> None:
    """The state of the run's last checkpoint: weights, optimiser, schedule, scaler, every RNG, the step."""
    ckpt = t.run.load_checkpoint()
    if ckpt["consumers"] != t.plan.consumers:
        raise ConfigError(
            f"--resume: the run used world_size x workers = {ckpt['consumers']} data consumers, now {t.plan.consumers}; "
            "the data order depends on it, so resume with the same number of ranks and --workers"
        )
    t.model.load_state_dict(ckpt["model"])
    t.optimizer.load_state_dict(ckpt["optimizer"])
    t.scheduler.load_state_dict(ckpt["scheduler"])
    t.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    t.start_step = ckpt["step"]
    t.grad_diag = ckpt.get("grad_diagnostics") or [{"step": st, "grad_cosine": c} for st, c in ckpt.get("grad_cosine", [])]
    t.best.update(ckpt.get("best") or {})
    t.epoch_terms.load(ckpt.get("epoch_terms"), t.ranks.device)  # a checkpoint of an older dho: the epoch's rest only
    t.summary = list(ckpt.get("summary") or [])
    if t.ema is not None:
        t.ema.load(ckpt["ema"])
    if t.gpa is not None:
        t.gpa.load(ckpt["gpa"])


def _setup_parallel(t: Training) -> None:
    """DistributedDataParallel under torchrun (SyncBatchNorm first with --sync-bn), and the step's forward + loss
    (one graph for torch.compile with --compile)."""
    cfg, ranks = t.cfg, t.ranks
    t.ddp = t.model
    if ranks.world_size > 1:
        if cfg.sync_bn:  # BatchNorm statistics over the global batch instead of each rank's share
            t.model = nn.SyncBatchNorm.convert_sync_batchnorm(t.model)  # replaces the BatchNorm children in place
            t.ddp = t.model
        device = ranks.device
        if t.task_grads is None:  # --grad-surgery averages each term's gradient over the ranks itself (TaskGrads)
            t.ddp = nn.parallel.DistributedDataParallel(t.model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp, model, objective = t.ddp, t.model, t.objective

    def forward_loss(batch) -> dict:
        """The hot path: both halves through the student, the method's loss terms."""
        out_l, out_u = ddp(*batch.images(), cfg.forward == "separate")
        return objective.terms(out_l, out_u, batch, model, cfg.lambda_, cfg.eta)

    t.step_fn = torch.compile(forward_loss) if cfg.compile else forward_loss


def _say_plan(t: Training, note: str, resume: bool) -> None:
    cfg, plan, ranks = t.cfg, t.plan, t.ranks
    if note:
        t.log.say(note)
    t.log.say(
        f"dho distill: {cfg.method} | student {cfg.student} | {len(t.streams.classnames)} classes | "
        f"{plan.steps_per_epoch} steps/epoch x {cfg.epochs} epochs = {plan.total_steps} steps "
        f"(batch {cfg.batch_size}+{cfg.batch_size}, {ranks.world_size} rank(s) x {max(cfg.workers, 1)} consumer(s)) | "
        f"device {ranks.device}" + (f" | resuming at step {t.start_step}" if resume else "")
    )
    for line in schedule.reuse_lines(t.streams.reuse(t.objective), plan.total_steps, cfg.batch_size):
        t.log.say(line)
    if "wandb" not in report_sinks(cfg.report_to) and (cfg.run_name or cfg.group or cfg.tags):
        t.log.say("note: --run-name, --group and --tags name the W&B run; without --report-to wandb they are only "
                  "recorded in config.json")
    lab = t.streams.labeled
    seen = np.bincount(lab.dataset.labels[lab.usable], minlength=len(t.streams.classnames))  # (C,) labeled per class
    if t.objective.reads_labeled and (seen == 0).any():
        missing = [t.streams.classnames[c] for c in np.flatnonzero(seen == 0)]
        t.log.say(f"warning: the labeled set {cfg.labeled} holds no usable sample of {len(missing)} of the "
                  f"{len(seen)} classes (first: {missing[0]!r}); the labels teach those classes nothing")


# ---------------------------------------------------------------------------------------------- the loop


def _train(t: Training, stop: StopSignal) -> int:
    """Steps until the end of the schedule or --max-steps -> the last step. SIGTERM/SIGINT/SIGUSR1 end it early: a
    checkpoint at the current step, then Interrupted (the CLI exits with status 3)."""
    cfg, plan, ranks = t.cfg, t.plan, t.ranks
    unchecked: list[tuple[int, dict]] = []  # (step, loss terms as device tensors), not yet checked to be finite
    progress = Progress("dho distill", (plan.stop_step - t.start_step) * t.objective.samples_per_step(cfg.batch_size),
                        unit="samples", every_s=None)  # the rate and ETA of the step lines
    t.model.train()
    step = t.start_step
    last_line = time.monotonic()  # the start of this log interval (for the data wait's share)
    while step < plan.stop_step:
        batch, terms, lr_used = _optimizer_step(t, stop, step, unchecked)
        step += 1
        t.epoch_terms.add(terms)
        if _TEST_STEP_SLEEP:
            time.sleep(_TEST_STEP_SLEEP)
        progress.update(t.objective.samples_per_step(cfg.batch_size))
        unchecked.append((step, terms))
        end_of_epoch = step % plan.steps_per_epoch == 0
        saving = step % cfg.checkpoint_every == 0 or end_of_epoch or step == plan.stop_step
        logging = step % cfg.log_every == 0 or step == plan.stop_step or step == t.start_step + 1
        sync_point = saving or logging or len(unchecked) >= 32  # the same steps on every rank
        stopping = stop.signum is not None
        if ranks.world_size > 1:  # every rank stops at the same step: agree at the sync points only
            stopping = sync_point and any_rank(stopping, ranks.device)
        if sync_point or stopping:
            terms = _check_finite(unchecked, plan)  # the last step's terms, as floats
        if logging and ranks.world_size > 1:
            terms = mean_over_ranks(terms, ranks.device, ranks.world_size)
        if t.objective.diagnostics_head and cfg.log_grad_cosine and step % cfg.log_grad_cosine == 0 and ranks.is_main:
            with _step_rng(t, step, cfg.accum_steps):  # its own masks, after the step's passes 0 .. accum_steps - 1
                record = {"step": step, **grad_diagnostics(t.model, batch, t.objective, cfg.eta, t.autocast)}
            t.grad_diag.append(record)
            t.log.write(record)
        if logging:
            now = time.monotonic()
            interval, last_line = now - last_line, now
            record = {"step": step, "epoch": step / plan.steps_per_epoch, "lr": lr_used, "samples_per_s": progress.rate(),
                      **{k: round(v, 6) for k, v in terms.items()}, "data_wait_s": round(t.batches.take_wait_s(), 4)}
            peak = _peak_memory_gib(ranks.device)
            if peak is not None:  # CUDA only: the key is absent on CPU
                record["peak_memory_gib"] = round(peak, 4)
            t.log.write(record)
            t.log.say(step_line(step, plan.stop_step, plan.steps_per_epoch, {k: record[k] for k in terms}, lr_used,
                                record["samples_per_s"], progress.eta(), data_wait_s=record["data_wait_s"],
                                interval_s=interval, peak_memory_gib=record.get("peak_memory_gib")))
        if saving or stopping:  # the same steps on every rank
            t.epoch_terms.average_over_ranks(ranks.world_size)
        summary_row = None
        if end_of_epoch or step == plan.stop_step:  # summary.csv: each epoch, and the part of one a run ends in
            summary_row = _summary_row(t, step, lr_used)
        if end_of_epoch:
            t.epoch_terms.reset()  # before the checkpoint: a resume starts the next epoch's sums
            if t.gpa is not None:
                t.gpa.add(t.student)  # PromptSRC's GPA: this epoch's weights, before the checkpoint keeps the sum
        if (saving or stopping) and ranks.is_main:
            _save_checkpoint(t, step)
        if stopping:
            if ranks.world_size > 1:
                torch.distributed.barrier()  # the checkpoint is on disk before any rank exits
            t.log.say(f"stopped by {stop.name} at step {step}/{plan.stop_step}; checkpoint {t.run.last}")
            t.log.close()
            raise _interrupted(t, stop, step)
        if end_of_epoch:
            summary_row.update(_end_of_epoch(t, step))
        if summary_row is not None:
            t.log.summary(t.summary)
    return step


def _summary_row(t: Training, step: int, lr: float) -> dict:
    """summary.csv's row of the epoch that `step` ends (or is in: the last row of a run stopped by --max-steps):
    epoch, step, the lr of its last step and the mean of each loss term over its steps; replaces the epoch's row."""
    epoch = -(-step // t.plan.steps_per_epoch)  # 1-based, the epoch in progress when the run stops inside one
    row = {"epoch": epoch, "step": step, "lr": lr, **{k: round(v, 6) for k, v in t.epoch_terms.means().items()}}
    t.summary = [r for r in t.summary if r["epoch"] != epoch] + [row]
    return row


def _peak_memory_gib(device: torch.device) -> Optional[float]:
    """The most CUDA memory the tensors of this process held since the previous call (GiB); None on other devices."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def _optimizer_step(t: Training, stop: StopSignal, step: int, unchecked: list) -> tuple:
    """One optimiser step of `cfg.accum_steps` forward passes -> (its last batch, the loss terms summed over the
    passes as device tensors, the learning rate it used)."""
    cfg, world = t.cfg, t.ranks.world_size
    terms_sum: dict = {}
    for micro_step in range(cfg.accum_steps):
        try:
            batch = next(t.batches)
        except RuntimeError as e:
            if not workers_gone(e, stop):
                raise
            # SIGTERM took the DataLoader workers too: the model is as it was after `step` steps
            if unchecked:
                _check_finite(unchecked, t.plan)  # never save weights after a non-finite loss
            if t.ranks.is_main:
                _save_checkpoint(t, step)
            raise _interrupted(t, stop, step) from None
        sync = micro_step == cfg.accum_steps - 1 or world == 1
        with t.ddp.no_sync() if (world > 1 and not sync and t.task_grads is None) else contextlib.nullcontext():
            with t.autocast(), _step_rng(t, step, micro_step):
                terms = t.step_fn(batch)
            if t.task_grads is None:
                t.scaler.scale(terms["loss"] / cfg.accum_steps).backward()
            else:  # --grad-surgery: each term's gradient apart, projected once the step's micro-batches are summed
                t.task_grads.add([t.scaler.scale(part / cfg.accum_steps) for part in t.objective.tasks(terms, cfg.lambda_)])
        for k, v in terms.items():  # device tensors: no host sync inside the step
            terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().float() / cfg.accum_steps
    if t.task_grads is not None:
        t.task_grads.apply_(world)
    if cfg.grad_clip > 0:
        t.scaler.unscale_(t.optimizer)
        torch.nn.utils.clip_grad_norm_(t.params, cfg.grad_clip)
    lr_used = t.optimizer.param_groups[0]["lr"]  # the rate of this step, before the schedule moves on
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    if t.ema is not None:
        t.ema.update(t.student)
    return batch, terms_sum, lr_used


def _step_rng(t: Training, step: int, index: int):
    """Dropout masks (the mlp heads' --head-dropout) drawn from torch's RNG seeded by (seed, rank, step, pass), the
    global state put back after: a resumed run draws the masks the uninterrupted one drew, whatever else drew from
    torch's RNG in between (a DataLoader iterator made at the resume draws its base seed). Without dropout nothing
    is touched (runs of linear heads stay as they were)."""
    if not t.dropout:
        return contextlib.nullcontext()
    device = t.ranks.device
    seed = int(np.random.SeedSequence([t.cfg.seed, t.ranks.rank, step, index]).generate_state(1)[0])

    @contextlib.contextmanager
    def seeded():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    return seeded()


def _check_finite(unchecked: list[tuple[int, dict]], plan: schedule.Plan) -> dict[str, float]:
    """Every pending step's loss, in one host sync; the first non-finite one is an error naming its step ->
    the last step's terms as floats."""
    values = torch.stack([terms["loss"] for _, terms in unchecked]).tolist()
    for (bad_step, terms), value in zip(unchecked, values):
        if not np.isfinite(value):
            raise DhoError(
                f"loss is {value} at step {bad_step} (epoch {bad_step // plan.steps_per_epoch}); terms: "
                + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                + ". Lower --lr, use --precision fp32/bf16, or --grad-clip 1.0"
            )
    last = {k: float(v) for k, v in unchecked[-1][1].items()}
    unchecked.clear()
    return last


def _save_checkpoint(t: Training, step: int) -> None:
    """checkpoints/last.pt: plain tensors and Python values (loads with torch.load(path)), + --keep-checkpoints."""
    t.run.save_checkpoint(
        {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
         "scaler": t.scaler.state_dict(), "rng": rng_state(), "step": step, "epoch": step // t.plan.steps_per_epoch,
         "consumers": t.plan.consumers, "grad_diagnostics": t.grad_diag, "config": t.cfg.to_dict(), "best": t.best,
         "epoch_terms": t.epoch_terms.state(), "summary": t.summary, **({"ema": t.ema.state()} if t.ema is not None else {}),
         **({"gpa": t.gpa.state()} if t.gpa is not None else {})},
        keep=t.cfg.keep_checkpoints,
    )


def _interrupted(t: Training, stop: StopSignal, step: int) -> Interrupted:
    return Interrupted(f"stopped by {stop.name} at step {step}/{t.plan.stop_step} with a checkpoint; continue with "
                       f"`dho distill --resume {t.run.path}`")


# ---------------------------------------------------------------------------------------------- validation


def _end_of_epoch(t: Training, step: int) -> dict:
    """--eval-every-epoch: score --val, keep the best epoch; --select-best-on-val: score the epoch the way its
    model predicts (the dual head: alpha/beta searched on --val) and keep it in checkpoints/best/ if better
    -> the scores (val_... keys; {} on other ranks or without either option), for summary.csv."""
    cfg, epoch = t.cfg, step // t.plan.steps_per_epoch
    scores: dict = {}
    if cfg.eval_every_epoch and t.val is not None and t.ranks.is_main:
        result = _validate(t)
        scores.update(result)
        t.log.write({"step": step, "epoch": epoch, **result})
        t.log.say(f"epoch {epoch} validation: " + format_val(result))
        if not cfg.select_best_on_val and result["val_combined_top1"] > t.best["top1"]:
            t.best.update(top1=result["val_combined_top1"], epoch=epoch, step=step)
            t.run.keep_best(t.reported, t.streams.classnames, *t.alpha_beta(), extra=_model_extra(t, step),
                            record={**t.best, "val": cfg.val, "metric": "val_combined_top1"}, raw=_raw(t))
        t.model.train()
    if cfg.select_best_on_val:
        if t.ranks.is_main:
            score = _select(t, step)
            scores["val_selection_top1"] = score
            t.log.write({"step": step, "epoch": epoch, "val_selection_top1": score, "best_val_top1": t.best["top1"],
                         "best_epoch": t.best["epoch"]})
            t.model.train()
        if t.ranks.world_size > 1:
            torch.distributed.barrier()
    return scores


def _val_logits(t: Training, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The heads' logits of `model` on the labeled samples of --val (restricted to its classes) and their labels."""
    ds, columns = t.val
    ce, kd, labels = evaluate.labeled_only(*evaluate.collect_logits(model, ds, batch_size=VAL_BATCH_SIZE,
                                                                     device=t.ranks.device, workers=t.cfg.workers))
    return (*evaluate.restrict(ce, kd, columns), labels)


def _validate(t: Training) -> dict:
    """Top-1 of ce_head, kd_head and the combination (Eq. 11, the method's alpha/beta) on --val, of the run's model
    (the EMA with --ema, as timm reports and keeps its EMA's) and with --ema also of the raw weights (val_raw_...)."""
    scores = {}
    for prefix, model in (("val_", t.reported), *((("val_raw_", t.student),) if t.ema is not None else ())):
        model.eval()
        ce, kd, labels = _val_logits(t, model)
        scores.update({
            f"{prefix}ce_head_top1": evaluate.topk_accuracy(ce, labels)[1],
            f"{prefix}kd_head_top1": evaluate.topk_accuracy(kd, labels)[1],
            f"{prefix}combined_top1": evaluate.topk_accuracy(evaluate.combine_heads(ce, kd, *t.alpha_beta()), labels)[1],
        })
    return scores


def _raw(t: Training) -> Optional[nn.Module]:
    """The trained weights, kept beside the EMA in model.pt with --ema (`dho ... --weights raw`); None without."""
    return t.student if t.ema is not None else None


def _select(t: Training, step: int) -> float:
    """--select-best-on-val: this epoch's top-1 on --val as its model would predict (a method without fixed
    alpha/beta has them searched there); a better epoch is kept in checkpoints/best/ and becomes RUN/model.pt
    when the schedule ends, as the reference keeps its best epoch: an unfinished run never has a model.pt."""
    t.reported.eval()
    searched = t.objective.alpha_beta is None
    if searched:
        t.run.selection.mkdir(exist_ok=True)
        ds, columns = t.val
        alpha, beta, score = evaluate.search_and_store(
            t.run.selection, t.reported, ds, VAL_BATCH_SIZE, t.ranks.device, t.cfg.workers, columns=columns,
            extra={"epoch": step // t.plan.steps_per_epoch, "step": step}, announce=False, beta_grid=t.cfg.beta_grid)
    else:
        ce, kd, labels = _val_logits(t, t.reported)
        alpha, beta = t.objective.alpha_beta
        score = evaluate.topk_accuracy(evaluate.combine_heads(ce, kd, alpha, beta), labels)[1]
    if score > t.best["top1"]:
        t.best.update(top1=score, epoch=step // t.plan.steps_per_epoch, step=step)
        t.run.keep_best(t.reported, t.streams.classnames, alpha, beta,
                        extra={**_model_extra(t, step), "selected_on_val": dict(t.best)},
                        record={**t.best, "val": t.cfg.val, "metric": "val_selection_top1"},
                        searched=t.run.selection if searched else None, raw=_raw(t))
    return score


def _model_extra(t: Training, step: int) -> dict:
    ema = {"ema": {"decay": t.cfg.ema, "warmup": t.cfg.ema_warmup, "updates": t.ema.updates}} if t.ema is not None else {}
    return {"method": t.cfg.method, "steps": step, "total_steps": t.plan.total_steps, **ema}


# ---------------------------------------------------------------------------------------------- the end


def _finish(t: Training, step: int) -> None:
    """RUN/model.pt (the last epoch, or with --select-best-on-val the best one), the final validation and the
    gradient-diagnostics plot; model.pt is written before anything that reads a finished run can look."""
    cfg, run = t.cfg, t.run
    if t.ranks.is_main:
        if cfg.select_best_on_val and t.best["epoch"] is not None:
            run.publish_best()
            shutil.rmtree(run.selection, ignore_errors=True)
            t.log.say(f"model.pt is epoch {t.best['epoch']} (step {t.best['step']}): the best on {cfg.val}, "
                      f"top-1 {t.best['top1']:.2f}" + (" with alpha/beta searched there" if t.objective.alpha_beta is None else ""))
        else:
            from dho.students import save_student

            if t.gpa is not None:
                t.log.say(t.gpa.finish(t.student))
            alpha, beta = t.alpha_beta()
            save_student(run.model, t.reported, t.streams.classnames, alpha=alpha, beta=beta, extra=_model_extra(t, step),
                         raw=_raw(t))
        if t.val is not None:
            result = _validate(t)
            t.log.write({"step": step, "final": True, **result})
            t.log.say("validation: " + format_val(result))
            for row in (r for r in t.summary if r["step"] == step):  # the last epoch's row: its numbers, if it has none
                for k, v in result.items():
                    row.setdefault(k, v)
            t.log.summary(t.summary)
        if t.grad_diag:
            plot_grad_diagnostics({cfg.method: t.grad_diag}, run.grad_plot)
        t.log.say(f"done: {run.model}")
    t.log.close()
    if t.ranks.world_size > 1:
        torch.distributed.barrier()
