"""Stage 2: train a dual-head student from datasets + teacher caches (Alg. 1). The teacher is never loaded.

`distill(cfg)` reads top to bottom: set-up (devices, ranks, data checks), model, optimiser and
schedule, optional resume, then one loop over steps. Each step takes a labeled and an
unlabeled mini-batch of equal size (1:1, the unlabeled one drawn from labeled ∪ unlabeled,
Alg. 1 line 7), computes the method's loss (dho.losses) and updates g, ce_head and kd_head.

Methods (`--method`):
  dho            Eq. 6-7: CE on ce_head (labeled), KD on kd_head (labeled + unlabeled); both heads kept.
  ce             CE on ce_head, labeled only.
  kd             logit KD on kd_head, unlabeled stream only.
  ce+kd          single head (SHO, Eq. 2-3): CE and KD on ce_head.
  ce+kd-feature  single head: CE on ce_head + MSE between projected student features and the
                 teacher's image embeddings (CLIP-KD style); needs `embeddings` in the caches.

An epoch is one pass over the unlabeled stream, for every method, so baselines get the same
number of steps; the labeled stream cycles. The unlabeled stream (`unlabeled_pool`) is labeled ∪
unlabeled (`union`, Alg. 1 line 7) or the unlabeled pool without the labeled samples
(`exclude-labeled`, what the reference code's loaders do). Learning rate (`lr_schedule`):
`warmup-cosine` is a linear warm-up to the base rate over `warmup_steps`, then a cosine to 0 at the
last step (Table 6's wording); `reference` is the authors' code: a linear warm-up from 0.01 of the
base rate over `warmup_steps` multiplied by a cosine over (total - warmup_steps) steps that starts at
step 0 (torch's ChainedScheduler of LinearLR and CosineAnnealingLR), with epochs of
ceil(stream / batch) steps as a DataLoader without drop_last. docs/fidelity.md lists every such
choice. At start the run prints how often each cached (sample, view) will be drawn and warns past
REUSE_WARN: a labeled set drawn thousands of times through a few cached crops loses augmentation.

Out of scope: mixed teacher caches within one stream (all caches must share class list and
teacher temperature).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dho import data, losses
from dho.devices import resolve_device
from dho.interrupt import StopSignal, ignore_interrupt, workers_gone
from dho.errors import CacheError, ConfigError, DhoError, Interrupted, check_choice, check_number
from dho.data.gpu_views import decode_views
from dho.stream import Part, PairedStream

# Test-only: seconds to sleep after each step, so a test can SIGKILL a run mid-way.
_TEST_STEP_SLEEP = float(os.environ.get("DHO_TEST_STEP_SLEEP", "0"))
METHODS = ("dho", "ce", "kd", "ce+kd", "ce+kd-feature")
# Inference defaults stored with each method's model (Eq. 11): single-head methods predict with
# the head they trained (alpha = 1 -> ce_head; alpha = 0, beta = 1 -> kd_head).
METHOD_ALPHA_BETA = {"dho": None, "ce": (1.0, 1.0), "kd": (0.0, 1.0), "ce+kd": (1.0, 1.0), "ce+kd-feature": (1.0, 1.0)}
LR_SCHEDULES = ("warmup-cosine", "reference", "linear")
UNLABELED_POOLS = ("union", "exclude-labeled")
EPOCHS = ("unlabeled", "shorter")  # an epoch: one pass over the unlabeled stream, or over the shorter of the two
FORWARDS = ("joint", "separate")
DECODES = ("cpu", "gpu")  # where the training views are decoded and resampled (see dho/gpu_views.py)
REUSE_WARN = 10  # warn when a cached (sample, view) is drawn more often than this over the run


@dataclass(frozen=True)
class DistillConfig:
    """Every training option in one place; the defaults follow the paper (Table 6)."""

    labeled: str
    labeled_cache: str
    student: str
    out: str
    unlabeled: Optional[str] = None  # the unlabeled pool; samples already in `labeled` are not repeated
    unlabeled_cache: Optional[str] = None
    method: str = "dho"
    student_pretrained: Optional[str] = None  # tag / local checkpoint / none (random init)
    epochs: int = 20  # few-shot ImageNet: 20; 10 datasets: 200; low-shot: 32
    batch_size: int = 64  # per side and global over ranks: B labeled + B unlabeled per step (paper: 256+256)
    lr: float = 1e-3  # low-shot CLIP students: 5e-5
    weight_decay: float = 1e-2  # low-shot CLIP students: 5e-2
    warmup_steps: int = 0  # linear warmup, then cosine decay to 0 (low-shot: 5000)
    warmup_fraction: Optional[float] = None  # warm-up as a fraction of all steps (overrides warmup_steps)
    lr_schedule: str = "warmup-cosine"  # or "reference" / "linear" (the authors' code; see the module docstring)
    unlabeled_pool: str = "union"  # unlabeled batches from labeled ∪ unlabeled, or "exclude-labeled" (reference code)
    epoch: str = "unlabeled"  # one pass over the unlabeled stream, or "shorter" (the reference's zip of two loaders)
    forward: str = "joint"  # one forward over [labeled; unlabeled], or "separate" (two: BatchNorm statistics apart)
    select_best_on_val: bool = False  # keep the epoch best on --val (alpha/beta searched there), as the reference
    lambda_: float = 0.5  # L = lambda * L_CE + (1 - lambda) * L_KD
    eta: float = 2.0  # KD temperature; the cache is re-tempered exactly if it was stored at another eta
    zeta: float = 0.01  # scale 1/zeta of the aligned cosine kd_head (VLM students)
    alpha: float = 0.5  # inference mix of the heads (Eq. 11), stored with the model
    beta: float = 0.5  # inference temperature of kd_head (Eq. 11)
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    workers: int = 2  # DataLoader workers per rank (decode + crop replay)
    seed: int = 0
    view_sampling: str = "cycle"  # cycle: view = pass mod V; random: per (seed, key, pass)
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    accum_steps: int = 1  # gradient accumulation: each optimiser step = accum_steps forward passes
    checkpoint_every: int = 500  # steps between checkpoints (also written at the end of each epoch)
    log_every: int = 20  # steps between metric lines
    max_steps: Optional[int] = None  # stop early after this many steps (smoke runs); the schedule keeps its length
    val: Optional[str] = None  # validation dataset evaluated at the end (and per epoch with eval_every_epoch)
    eval_every_epoch: bool = False
    log_grad_cosine: int = 0  # every N steps: the gradient-conflict diagnostics of Figs. 4 and 13; 0 = off
    init_heads_from_text: bool = True  # language-aware init of both heads (VLM students)
    align_kd_head: bool = True  # kd_head aligned with the teacher's rule, Eq. 10 (VLM students)
    vlm_heads: str = "reference"  # form of the aligned head and text init: "reference" (authors' code) | "eq10"
    interpolation: Optional[str] = None  # student resampling (bilinear | bicubic); None = the student's own
    window: int = 2  # shards per shuffle window of each consumer
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over all ranks (SyncBatchNorm)
    compile: bool = False  # torch.compile the student's forward + loss (execution only: same math, fused kernels)
    report_to: str = "jsonl"  # metrics sinks, comma-separated: jsonl (always) | tensorboard | wandb
    keep_checkpoints: int = 1  # checkpoints kept: last.pt, plus step-S.pt of the newest N when N > 1
    decode: str = "cpu"  # cpu: workers decode + replay the views (PIL); gpu: JPEG batches decoded on the CUDA device

    def __post_init__(self) -> None:
        """Type and range of every option, wherever the config came from (command line, --config YAML,
        config.json on resume, Python): YAML's `5e-5` arrives as a string and becomes a float here."""
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), str(f.type)))
        if not self.student.strip():
            raise ConfigError("--student must name a student (see `dho distill --help`)")
        check_choice("--method", self.method, METHODS)
        check_choice("--lr-schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("--unlabeled-pool", self.unlabeled_pool, UNLABELED_POOLS)
        check_choice("--epoch", self.epoch, EPOCHS)
        check_choice("--forward", self.forward, FORWARDS)
        if self.warmup_fraction is not None:
            check_number("--warmup-fraction", self.warmup_fraction, low=0, high=1)
        if self.select_best_on_val and self.val is None:
            raise ConfigError("--select-best-on-val needs --val DATASET (a validation split)")
        check_choice("--precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        check_choice("--view-sampling", self.view_sampling, ("cycle", "random"))
        check_choice("--vlm-heads", self.vlm_heads, ("reference", "eq10"))
        check_choice("--decode", self.decode, DECODES)
        report_sinks(self.report_to)  # names and installed packages, before anything runs
        if self.interpolation is not None:
            check_choice("--interpolation", self.interpolation, ("bilinear", "bicubic"))
        for option, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--accum-steps", self.accum_steps),
                              ("--checkpoint-every", self.checkpoint_every), ("--log-every", self.log_every),
                              ("--window", self.window), ("--keep-checkpoints", self.keep_checkpoints)):
            check_number(option, value, low=1, integer=True)
        for option, value in (("--warmup-steps", self.warmup_steps), ("--workers", self.workers),
                              ("--log-grad-cosine", self.log_grad_cosine)):
            check_number(option, value, low=0, integer=True)
        check_number("--seed", self.seed, low=0, high=2**32 - 1, integer=True)
        if self.max_steps is not None:
            check_number("--max-steps", self.max_steps, low=1, integer=True)
        check_number("--lr", self.lr, low=0, low_open=True)
        check_number("--weight-decay", self.weight_decay, low=0)
        check_number("--grad-clip", self.grad_clip, low=0)
        check_number("--lambda", self.lambda_, low=0, high=1)
        check_number("--alpha", self.alpha, low=0, high=1)
        for option, value in (("--eta", self.eta), ("--zeta", self.zeta), ("--beta", self.beta)):
            check_number(option, value, low=0, low_open=True)

    @staticmethod
    def load(path: Path) -> "DistillConfig":
        """Strict load of a resolved config.json: unknown keys are an error."""
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(DistillConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown config keys {unknown}; known keys: {sorted(known)}")
        return DistillConfig(**raw)


def _coerce(name: str, value, annotation: str):
    """A config value as its field's type: numbers from strings (YAML reads `5e-5` as a string), ints
    from integral floats; anything else that does not fit is a ConfigError naming the option."""
    option = "--" + ("lambda" if name == "lambda_" else name.replace("_", "-"))
    optional = annotation.startswith("Optional[")
    kind = annotation[len("Optional["):-1] if optional else annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{option} needs a value")
    try:
        if kind == "int" and not isinstance(value, bool):
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and number.is_integer():
                number = int(number)
            if isinstance(number, int):
                return number
        elif kind == "float" and not isinstance(value, bool):
            return float(value)
        elif kind == "bool" and isinstance(value, bool):
            return value
        elif kind == "str" and isinstance(value, (str, Path)):
            return str(value)
    except (TypeError, ValueError):
        pass
    wanted = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(kind, kind)
    raise ConfigError(f"{option} must be {wanted}; got {value!r}")


# Options that may change on --resume without changing the result.
# Anything that changes the data order or the numerics (workers set the thread count and the consumers,
# the device the kernels) is refused on resume.
RESUME_FREE = {"log_every", "checkpoint_every", "max_steps", "val", "eval_every_epoch", "report_to", "keep_checkpoints"}
# compile and decode change the kernels / pixels (slightly): a run keeps its own, so a resume stays bit-identical


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) — torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain runs are 0/1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device)  # cuda:LOCAL_RANK under torchrun, cuda:N as asked otherwise
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def _check_decode(decode: str, device: torch.device) -> None:
    """--decode gpu decodes with nvJPEG on the training device, so it needs a CUDA one."""
    if decode == "gpu" and device.type != "cuda":
        raise ConfigError(f"--decode gpu needs a CUDA device (this run trains on {device}); use --decode cpu")


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the value was checked by DistillConfig
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return table[precision]


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


def _train_views(cache) -> int:
    """Augmented views of a cache that training draws from (an optional center view is stored last and skipped)."""
    return cache.num_views - int(bool(cache.attrs.get("center_view", False)))


def _open_part(dataset: str, cache: str, role: str):
    """Open a dataset and its cache and check they belong together (keys, classes, completeness)."""
    from dho.cache import TeacherCache

    ds = data.Dataset.open(dataset)
    tc = TeacherCache.open(cache, dataset=ds)
    if not tc.is_complete():
        raise CacheError(
            f"{cache}: the teacher cache for the {role} set is incomplete (see `dho cache-info {cache}`); "
            "re-run the same `dho precompute-teacher` command to finish it"
        )
    return ds, tc


def _memory_format(student: nn.Module, device: torch.device) -> Optional[torch.memory_format]:
    """channels_last for convolutional students (torchvision, timm) on CUDA; None (as built) otherwise."""
    kind = getattr(student, "build_args", {}).get("kind")
    return torch.channels_last if device.type == "cuda" and kind in ("torchvision", "timm") else None


class Trainee(nn.Module):
    """The student plus training-only parts (the feature-KD projection); only `student` is exported."""

    def __init__(self, student: nn.Module, projection: Optional[nn.Module]):
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(self, l_image: Optional[torch.Tensor], u_image: Optional[torch.Tensor], separate: bool = False):
        """-> (outputs of the labeled half, of the unlabeled half); either may be None. Joint: one forward over
        [labeled; unlabeled], so both share the BatchNorm statistics; separate: two (the ten-dataset reference)."""
        if l_image is None or u_image is None:
            return (self.student(l_image) if l_image is not None else None,
                    self.student(u_image) if u_image is not None else None)
        if separate:
            return self.student(l_image), self.student(u_image)
        n_l = l_image.shape[0]
        both = self.student(torch.cat([l_image, u_image]))  # (B_l + B_u, ...)
        return {k: v[:n_l] for k, v in both.items()}, {k: v[n_l:] for k, v in both.items()}


def _compute_loss(method: str, out_l: Optional[dict], out_u: Optional[dict], batch: dict, model: Trainee, cfg: DistillConfig) -> dict:
    """The method's loss terms (dho.losses), as a dict with `loss` and named parts."""
    if method == "dho":
        return losses.dho_loss(
            out_l["ce_logits"], out_l["kd_logits"], batch["l_label"], batch["l_probs"],
            out_u["kd_logits"], batch["u_probs"], lambda_=cfg.lambda_, eta=cfg.eta,
        )
    if method == "ce":
        return losses.ce_only(out_l["ce_logits"], batch["l_label"])
    if method == "kd":
        return losses.kd_only(out_u["kd_logits"], batch["u_probs"], eta=cfg.eta)
    if method == "ce+kd":
        return losses.sho_loss(
            out_l["ce_logits"], batch["l_label"], batch["l_probs"], out_u["ce_logits"], batch["u_probs"],
            lambda_=cfg.lambda_, eta=cfg.eta,
        )
    if method == "ce+kd-feature":
        z = torch.cat([out_l["z"], out_u["z"]])  # (B_l + B_u, D)
        emb = torch.cat([batch["l_emb"], batch["u_emb"]])  # (B_l + B_u, D_teacher)
        return losses.ce_feature_kd_loss(out_l["ce_logits"], batch["l_label"], z, emb, model.projection, lambda_=cfg.lambda_)
    raise ConfigError(f"--method must be one of {METHODS}, got {method!r}")


def _grad_diagnostics(model: Trainee, batch: dict, cfg: DistillConfig, autocast) -> dict:
    """The gradient-conflict quantities of Figs. 4 and 13 on one batch (dho: the two heads; ce+kd: one head
    for both losses, p_hat_CE = p_hat_KD):

    grad_cosine    cos(∇θ L_CE, ∇θ L_KD) over the feature extractor g's parameters (Fig. 4);
    grad_cosine_z  cos(∇z L_CE, ∇z L_KD) per labeled sample, averaged (Eq. 5, Fig. 13 right);
    pred_inner     (p_hat_CE - y)^T (p_hat_KD - p) per labeled sample, averaged (Eqs. 4-5 / 8-9, Fig. 4's x);
    pred_inner_negative  the share of labeled samples where it is < 0;
    eig_ce, eig_kd, eig_ce_kd  dominant eigenvalues of W_CE W_CE^T, W_KD W_KD^T, W_CE W_KD^T (Fig. 13 left;
                   single head: eig_ce only).
    L_KD is the training loss's: eta^2 KL on the labeled and on the unlabeled half."""
    from dho.students import dominant_eigenvalue, head_weight

    student = model.student
    params = [p for p in student.backbone.parameters() if p.requires_grad]
    kd_head = student.kd_head if cfg.method == "dho" else student.ce_head  # SHO: one head for both
    with autocast():
        z_l = student.features(batch["l_image"])  # (B_l, D)
        z_u = student.features(batch["u_image"])  # (B_u, D)
        ce_logits = student.ce_head(z_l)  # (B_l, C)
        kd_logits = kd_head(z_l)  # (B_l, C)
        ce = losses.ce_loss(ce_logits, batch["l_label"])
        kd = losses.kd_loss(kd_logits, batch["l_probs"], eta=cfg.eta) + losses.kd_loss(kd_head(z_u), batch["u_probs"], eta=cfg.eta)
    *g_ce, gz_ce = torch.autograd.grad(ce, params + [z_l], retain_graph=True, allow_unused=True)
    *g_kd, gz_kd = torch.autograd.grad(kd, params + [z_l], allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float() for g, p in zip(gs, params)])
    inner = losses.prediction_conflict(ce_logits.detach(), kd_logits.detach(), batch["l_label"], batch["l_probs"], cfg.eta)  # (B_l,)
    w_ce = head_weight(student.ce_head)
    out = {
        "grad_cosine": float(F.cosine_similarity(flat(g_ce), flat(g_kd), dim=0)),
        "grad_cosine_z": float(F.cosine_similarity(gz_ce.float(), gz_kd.float(), dim=-1).mean()),
        "pred_inner": float(inner.mean()),
        "pred_inner_negative": float((inner < 0).float().mean()),
        "eig_ce": dominant_eigenvalue(w_ce),
    }
    if cfg.method == "dho":
        w_kd = head_weight(student.kd_head)
        out.update(eig_kd=dominant_eigenvalue(w_kd), eig_ce_kd=dominant_eigenvalue(w_ce, w_kd))
    return out


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values, so a checkpoint loads with plain
    `torch.load(path)` (weights_only: no numpy objects, no pickled classes)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n, py = state["numpy"], state["python"]
    if isinstance(n, dict):
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    else:  # checkpoints of dho <= 0.1 (numpy's own tuple; they need torch.load(weights_only=False))
        np.random.set_state(n)
        random.setstate(py)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prepare_run_dir(out: Path, cfg: DistillConfig, resume: bool) -> tuple[bool, str]:
    """Decide what `--out` holds and what this command does with it -> (resume?, note for the log).

    A folder with files but no config.json is not a run: refused, nothing of the user's is touched.
    A finished run (model.pt) or a run with a checkpoint needs --resume. A run that died before its
    first checkpoint is started again by the same command, with or without --resume.
    """
    ckpt = out / "checkpoints" / "last.pt"
    is_run = (out / "config.json").is_file()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a run folder")
    if out.is_dir() and any(out.iterdir()) and not is_run:
        raise ConfigError(f"--out {out} holds files but no dho run (no config.json); choose a new or empty folder")
    note = ""
    if resume and not ckpt.is_file():
        if not is_run:
            raise ConfigError(f"--resume: {out} holds no run to resume; start it without --resume")
        resume, note = False, f"{out} has no checkpoint yet (the run stopped before its first one): starting it again"
    elif not resume and is_run:
        if (out / "model.pt").is_file():
            raise ConfigError(f"{out} already holds a finished run; choose another --out (or --resume to rerun its end)")
        if ckpt.is_file():
            step = torch.load(ckpt, map_location="cpu", weights_only=False).get("step", "?")
            raise ConfigError(f"{out} holds a run stopped at step {step}; pass --resume to continue it, or choose another --out")
        note = f"{out} holds a run that stopped before its first checkpoint: starting it again"
    if resume:
        old = DistillConfig.load(out / "config.json")
        diffs = [f.name for f in dataclasses.fields(cfg) if f.name not in RESUME_FREE and getattr(old, f.name) != getattr(cfg, f.name)]
        if diffs:
            changed = ", ".join(f"{d}: {getattr(old, d)!r} -> {getattr(cfg, d)!r}" for d in diffs)
            raise ConfigError(f"--resume with changed options ({changed}); they change the data order or the numerics: "
                              f"resume with the run's options (`dho distill --resume {out}` takes them from its config.json)")
    return resume, note


def _write_run_dir(out: Path, cfg: DistillConfig, resume: bool) -> None:
    """The run folder's skeleton and resolved config (rank 0, after every rank has read the old state)."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # the failed attempt's own log, not the user's
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n")


def _check_val(cfg: DistillConfig, classnames: list[str]) -> None:
    """--val is checked before training, not after it: same class list, some labeled samples."""
    if cfg.val is None:
        return
    val = data.Dataset.open(cfg.val)
    if list(val.classnames) != list(classnames):
        raise ConfigError(f"--val {cfg.val} has another class list ({len(val.classnames)} classes) than {cfg.labeled} "
                          f"({len(classnames)}); validate on a split of the same dataset")
    if not (np.asarray(val.labels) >= 0).any():
        raise ConfigError(f"--val {cfg.val} has no labeled samples; validation needs labels")


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


REPORT_TO = ("jsonl", "tensorboard", "wandb")
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


def report_sinks(report_to: str) -> list[str]:
    """--report-to 'tensorboard,wandb' -> ['jsonl', 'tensorboard', 'wandb'] (jsonl always), checked:
    an unknown name or a sink whose package is missing is a one-line error before training starts."""
    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ConfigError(f"--report-to {report_to!r}: unknown {unknown}; choose from {', '.join(REPORT_TO)} (comma-separated)")
    sinks = ["jsonl"] + [n for n in REPORT_TO[1:] if n in names]
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for sink in sinks[1:]:
        try:
            __import__(module[sink])
        except ImportError:
            raise ConfigError(f"--report-to {sink} needs the {sink} package, which is not installed: "
                              f"pip install 'dho[{sink}]' (or drop {sink} from --report-to)") from None
    return sinks


class _Log:
    """Metrics to RUN_DIR/metrics.jsonl (flat keys, always) and to TensorBoard / W&B with grouped names
    (`metric_name`) as --report-to asks; progress lines to stdout and RUN_DIR/log.txt."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None = None, sinks: Sequence[str] = ("jsonl",),
                 config: Optional[dict] = None):
        self.enabled = enabled
        path = out / "metrics.jsonl"
        if enabled and resume_step is not None and path.exists():
            # records after the checkpoint were written by the interrupted run and come again: drop them
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = open(path, "a") if enabled else None
        self.text = open(out / "log.txt", "a") if enabled else None  # the console output, appended on resume
        self.tb = self.wandb = None
        if enabled and "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if enabled and "wandb" in sinks:
            import wandb

            id_file = out / "wandb_id.txt"  # one W&B run per dho run, continued on --resume
            if not id_file.is_file():
                id_file.write_text(uuid.uuid4().hex[:12] + "\n")
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "dho"), name=out.name, dir=str(out),
                                    id=id_file.read_text().strip(), resume="allow", config=config or {})

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


def distill(cfg: DistillConfig, resume: bool = False) -> Path:
    """Train the student of `cfg` and write RUN_DIR (config.json, metrics.jsonl, checkpoints/, model.pt)."""
    from dho.students import build_student, save_student

    out = Path(cfg.out)
    if cfg.sync_bn and int(os.environ.get("WORLD_SIZE", "1")) > 1 and resolve_device(cfg.device).type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); drop it on CPU")
    rank, world, device = _setup_distributed(cfg.device)
    is_main = rank == 0
    num_workers = max(cfg.workers, 1)
    autocast_dtype = _autocast_dtype(cfg.precision, device)
    _check_decode(cfg.decode, device)
    if device.type == "cpu" and cfg.workers > 0:
        # The workers decode on the same cores: an OpenMP pool as wide as the machine spins while they
        # wait and starves them (measured 60x slower on 2 cores). Leave one core per worker.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world - cfg.workers))

    # ---- data: datasets + caches, checked against each other --------------------------------
    uses_labeled = cfg.method != "kd"
    uses_unlabeled = cfg.method != "ce"
    l_ds, l_cache = _open_part(cfg.labeled, cfg.labeled_cache, "labeled")
    if (l_ds.labels < 0).any():
        bad = l_ds.key(int(np.flatnonzero(l_ds.labels < 0)[0]))
        raise ConfigError(f"{cfg.labeled}: the labeled set has unlabeled samples (e.g. key {bad!r}); make it with `dho split`")
    parts_u: list[Part] = []
    sizes_u = 0
    if cfg.unlabeled is not None:
        if cfg.unlabeled_cache is None:
            raise ConfigError("--unlabeled needs --unlabeled-cache (made by `dho precompute-teacher` on that dataset)")
        u_ds, u_cache = _open_part(cfg.unlabeled, cfg.unlabeled_cache, "unlabeled")
        if u_ds.classnames != l_ds.classnames:
            raise ConfigError(f"{cfg.unlabeled} and {cfg.labeled} have different class lists; both must come from one source dataset")
        for name in ("eta", "zeta"):
            if u_cache.attrs[name] != l_cache.attrs[name]:
                raise CacheError(f"the labeled and unlabeled caches were made with different {name} ({l_cache.attrs[name]} vs {u_cache.attrs[name]})")
        if cfg.unlabeled_pool == "exclude-labeled":
            # the reference code's unlabeled loader: the pool without the labeled samples
            part = Part(Path(cfg.unlabeled), Path(cfg.unlabeled_cache), exclude=l_ds.key_bytes)
            parts_u.append(part)
            sizes_u += int(part.usable(u_ds.key_bytes, u_cache.valid).sum())
        else:
            parts_u.append(Part(Path(cfg.unlabeled), Path(cfg.unlabeled_cache)))
            sizes_u += int(np.asarray(u_cache.valid).sum())
        views_u = [_train_views(u_cache)]
        # Alg. 1 line 7: unlabeled batches come from labeled ∪ unlabeled. If the unlabeled pool
        # already holds every labeled key (e.g. the full train set), it *is* that union.
        if cfg.unlabeled_pool == "union" and not np.isin(l_ds.key_bytes, u_ds.key_bytes).all():
            parts_u.append(Part(Path(cfg.labeled), Path(cfg.labeled_cache)))
            sizes_u += int(np.asarray(l_cache.valid).sum())
            views_u.append(_train_views(l_cache))
    elif uses_unlabeled:
        raise ConfigError(f"--method {cfg.method} needs --unlabeled DATASET --unlabeled-cache CACHE")
    if cfg.method == "ce+kd-feature" and "embeddings" not in l_cache.group:
        raise CacheError(
            f"{cfg.labeled_cache}: --method ce+kd-feature needs teacher image embeddings in the caches; "
            "re-run `dho precompute-teacher ... --store-embeddings`"
        )
    if cfg.method == "ce+kd-feature":
        from dho.cache import TeacherCache

        for p in parts_u:
            if "embeddings" not in TeacherCache.open(p.cache_path).group:
                raise CacheError(f"{p.cache_path}: --method ce+kd-feature needs `--store-embeddings` caches")
    classnames = list(l_ds.classnames)
    num_classes = len(classnames)
    if l_cache.num_classes != num_classes:
        raise CacheError(f"{cfg.labeled_cache} has {l_cache.num_classes} classes but {cfg.labeled} has {num_classes}")
    if cfg.unlabeled is not None and sizes_u == 0:
        raise ConfigError(f"the unlabeled stream is empty: every sample of {cfg.unlabeled} is labeled or invalid; "
                          "use --unlabeled-pool union or a larger pool")
    size_l = int(np.asarray(l_cache.valid).sum())
    epoch_size = sizes_u if sizes_u else size_l  # one pass over the unlabeled stream, for every method (ce too)
    if cfg.epoch == "shorter" and sizes_u:  # the reference's zip(labeled loader, unlabeled loader)
        epoch_size = min(size_l, sizes_u)

    consumers = world * num_workers
    per_forward = cfg.batch_size // cfg.accum_steps
    if cfg.batch_size % (consumers * cfg.accum_steps):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be divisible by world_size x workers x accum_steps = "
            f"{world} x {num_workers} x {cfg.accum_steps}; pick a batch size that is a multiple of {consumers * cfg.accum_steps}"
        )
    micro = per_forward // consumers  # samples per side, per consumer, per forward pass
    steps_per_epoch, total_steps = schedule_steps(epoch_size, cfg.batch_size, cfg.epochs, cfg.lr_schedule)
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    reuse = []  # (stream, samples, views, draws per sample) of each stream this method reads
    if uses_labeled:
        reuse.append(("labeled", size_l, _train_views(l_cache), draws_per_sample(total_steps, cfg.batch_size, size_l)))
    if uses_unlabeled:
        reuse.append(("unlabeled", sizes_u, min(views_u), draws_per_sample(total_steps, cfg.batch_size, sizes_u)))

    _check_val(cfg, classnames)

    # ---- run directory, config, resume ----------------------------------------------------
    ckpt_path = out / "checkpoints" / "last.pt"
    resume, run_note = _prepare_run_dir(out, cfg, resume)  # every rank reads the old state ...
    if world > 1:
        torch.distributed.barrier()
    if is_main:
        _write_run_dir(out, cfg, resume)  # ... before rank 0 writes the new one
    if world > 1:
        torch.distributed.barrier()

    # ---- model, optimiser, schedule -----------------------------------------------------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    student = build_student(
        cfg.student, num_classes, pretrained=cfg.student_pretrained, classnames=classnames,
        templates=l_cache.attrs.get("templates"), init_heads_from_text=cfg.init_heads_from_text,
        align_kd_head=cfg.align_kd_head, zeta=cfg.zeta, vlm_heads=cfg.vlm_heads, interpolation=cfg.interpolation,
    )
    projection = None
    if cfg.method == "ce+kd-feature":
        projection = nn.Linear(student.feature_dim, int(l_cache.attrs["embed_dim"]))
    if cfg.method in ("ce", "ce+kd", "ce+kd-feature"):
        student.kd_head.requires_grad_(False)  # single-head methods train ce_head only
    if cfg.method == "kd":
        student.ce_head.requires_grad_(False)
    model = Trainee(student, projection).to(device)
    memory_format = _memory_format(student, device)
    if memory_format is not None:  # CNN students on CUDA: NHWC convolutions (tensor cores without transposes)
        model = model.to(memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW on CUDA (one kernel for all parameters); CPU keeps the default implementation
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    schedule = {"reference": reference_lr_lambda, "linear": linear_lr_lambda, "warmup-cosine": lr_lambda}[cfg.lr_schedule]
    warmup = cfg.warmup_steps if cfg.warmup_fraction is None else cfg.warmup_fraction * total_steps
    warmup = warmup if cfg.lr_schedule == "linear" else int(round(warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, warmup, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
    start_step, grad_diag = 0, []
    best = {"top1": -1.0, "epoch": None, "step": None}  # --select-best-on-val: the best epoch so far
    if resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["consumers"] != consumers:
            raise ConfigError(
                f"--resume: the run used world_size x workers = {ckpt['consumers']} data consumers, now {consumers}; "
                "the data order depends on it, so resume with the same number of ranks and --workers"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
        grad_diag = ckpt.get("grad_diagnostics") or [{"step": st, "grad_cosine": c} for st, c in ckpt.get("grad_cosine", [])]
        best.update(ckpt.get("best") or {})
    ddp = model
    if world > 1:
        if cfg.sync_bn:  # BatchNorm statistics over the global batch instead of each rank's share
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BatchNorm children in place
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def forward_loss(batch: dict) -> dict:
        """The hot path: both halves through the student, the method's loss terms."""
        out_l, out_u = ddp(batch.get("l_image"), batch.get("u_image"), cfg.forward == "separate")
        return _compute_loss(cfg.method, out_l, out_u, batch, model, cfg)

    step_fn = torch.compile(forward_loss) if cfg.compile else forward_loss

    paired = PairedStream(
        [Part(Path(cfg.labeled), Path(cfg.labeled_cache))] if uses_labeled else [],
        parts_u if uses_unlabeled else [],
        micro_l=micro, micro_u=micro, seed=cfg.seed, rank=rank, world_size=world, num_workers=num_workers,
        start_item=start_step * cfg.accum_steps, view_sampling=cfg.view_sampling,
        image_size=student.preprocess["image_size"], interpolation=student.preprocess["interpolation"], eta=cfg.eta,
        need_embeddings=cfg.method == "ce+kd-feature", window=cfg.window, raw=cfg.decode == "gpu",
    )
    loader = torch.utils.data.DataLoader(
        paired, batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if cfg.workers > 0 else None,
        worker_init_fn=ignore_interrupt if cfg.workers > 0 else None,
    )
    batches = iter(loader)

    def next_forward_batch() -> dict:
        """Concatenate one micro-batch from each of this rank's W consumers (round-robin order)."""
        items = [next(batches) for _ in range(num_workers)]
        raw = [k for k in items[0] if k.endswith(("_data", "_ext", "_params"))]  # --decode gpu: encoded images + boxes
        # copy each pinned micro-batch (asynchronous), then concatenate on the device
        batch = {k: torch.cat([it[k].to(device, non_blocking=True) for it in items]) for k in items[0] if k not in raw}
        paired.densify(batch, num_classes)  # top-k caches: (b, K) rows -> (b, C) targets on the device
        for side in ("l", "u"):
            if f"{side}_data" in raw:  # the W micro-batches' JPEGs decoded in one batch on the device
                batch[f"{side}_image"] = decode_views(
                    [b for it in items for b in it[f"{side}_data"]], [e for it in items for e in it[f"{side}_ext"]],
                    torch.cat([it[f"{side}_params"] for it in items]),  # (b, 5) on the host
                    student.preprocess["image_size"], student.preprocess["interpolation"], device,
                )  # (b, 3, S, S) uint8
        for k in ("l_image", "u_image"):
            if k in batch:  # uint8 from the workers -> the student's normalisation, on the device
                batch[k] = data.normalize(batch[k], student.preprocess["mean"], student.preprocess["std"])
                if memory_format is not None:
                    batch[k] = batch[k].contiguous(memory_format=memory_format)
        return batch

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    log = _Log(out, enabled=is_main, resume_step=start_step if resume else None, sinks=report_sinks(cfg.report_to),
               config=dataclasses.asdict(cfg))
    if run_note:
        log.say(run_note)
    log.say(
        f"dho distill: {cfg.method} | student {cfg.student} | {num_classes} classes | "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs = {total_steps} steps "
        f"(batch {cfg.batch_size}+{cfg.batch_size}, {world} rank(s) x {num_workers} consumer(s)) | device {device}"
        + (f" | resuming at step {start_step}" if resume else "")
    )
    for stream, size, views, draws in reuse:
        per_view = draws / views
        log.say(f"{stream} stream: {size} samples x {views} cached views; each sample is drawn ~{draws:.1f} times, "
                f"each (sample, view) ~{per_view:.1f} times over the run")
        if per_view > REUSE_WARN:
            log.say(f"warning: each {stream} (sample, view) is used ~{per_view:.0f} times (more than {REUSE_WARN}): the same "
                    f"few crops repeat instead of fresh augmentation; precompute that cache with --views "
                    f"{math.ceil(draws / REUSE_WARN)} or more")

    # ---- the loop ---------------------------------------------------------------------------
    # Loss finiteness is checked a few steps late, in one host sync, so that the CPU can queue the
    # next step while the GPU runs this one; it is always checked before logging or saving, and the
    # error names the first bad step (the weights after it are never saved).
    unchecked: list[tuple[int, dict]] = []  # (step, terms as device tensors)

    def check_finite() -> dict[str, float]:
        values = torch.stack([t["loss"] for _, t in unchecked]).tolist()
        for (bad_step, terms_), value in zip(unchecked, values):
            if not math.isfinite(value):
                raise DhoError(
                    f"loss is {value} at step {bad_step} (epoch {bad_step // steps_per_epoch}); terms: "
                    + ", ".join(f"{k}={float(v):.4g}" for k, v in terms_.items())
                    + ". Lower --lr, use --precision fp32/bf16, or --grad-clip 1.0"
                )
        last = {k: float(v) for k, v in unchecked[-1][1].items()}
        unchecked.clear()
        return last

    model.train()
    t0, seen_since, t_last = time.time(), 0, time.time()
    def save_checkpoint(step: int) -> None:
        """checkpoints/last.pt (plain tensors and Python values: loads with torch.load(path)); with
        --keep-checkpoints N > 1 also step-S.pt (a hard link where the filesystem allows) of the newest N."""
        _atomic_save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": _rng_state(), "step": step, "epoch": step // steps_per_epoch,
             "consumers": consumers, "grad_diagnostics": grad_diag, "config": dataclasses.asdict(cfg), "best": best},
            ckpt_path,
        )
        if cfg.keep_checkpoints > 1:
            kept = ckpt_path.with_name(f"step-{step:09d}.pt")
            kept.unlink(missing_ok=True)
            try:
                os.link(ckpt_path, kept)
            except OSError:
                shutil.copyfile(ckpt_path, kept)
            for old in sorted(ckpt_path.parent.glob("step-*.pt"))[:-cfg.keep_checkpoints]:
                old.unlink()

    def keep_best_val(step: int, top1: float) -> None:
        """--eval-every-epoch: the epoch best on --val so far (the run's alpha/beta) is kept as
        checkpoints/best/model.pt with best.json; RUN/model.pt stays the last epoch's."""
        if top1 <= best["top1"]:
            return
        best.update(top1=top1, epoch=step // steps_per_epoch, step=step)
        best_dir.mkdir(parents=True, exist_ok=True)
        alpha, beta = METHOD_ALPHA_BETA[cfg.method] or (cfg.alpha, cfg.beta)
        save_student(best_dir / "model.pt", student, classnames, alpha=alpha, beta=beta,
                     extra={"method": cfg.method, "steps": step, "total_steps": total_steps})
        (best_dir / "best.json").write_text(json.dumps({**best, "val": cfg.val, "metric": "val_combined_top1"}) + "\n")

    best_dir = out / "checkpoints" / "best"  # the best epoch so far; RUN/model.pt only once the schedule ends

    def keep_if_best(step: int) -> float:
        """--select-best-on-val: score this epoch on --val (dho: alpha/beta searched there); a better epoch
        is kept in checkpoints/best/ (model.pt, alpha_beta.json) and becomes RUN/model.pt at the end of the
        run, as the reference keeps its best epoch; an unfinished run never has a model.pt."""
        from dho import evaluate

        val_ds = data.Dataset.open(cfg.val)
        student.eval()
        if cfg.method == "dho":
            tmp = out / ".select"
            tmp.mkdir(exist_ok=True)
            alpha, beta, score = evaluate.search_and_store(tmp, student, val_ds, 256, device, cfg.workers,
                                                           extra={"epoch": step // steps_per_epoch, "step": step},
                                                           announce=False)
        else:
            ce, kd, labels = evaluate.collect_logits(student, val_ds, batch_size=256, device=device, workers=cfg.workers)
            alpha, beta = METHOD_ALPHA_BETA[cfg.method]
            score = evaluate.topk_accuracy(evaluate.combine_heads(ce, kd, alpha, beta), labels)[1]
        if score > best["top1"]:
            best.update(top1=score, epoch=step // steps_per_epoch, step=step)
            best_dir.mkdir(parents=True, exist_ok=True)
            save_student(best_dir / "model.pt", student, classnames, alpha=alpha, beta=beta,
                         extra={"method": cfg.method, "steps": step, "total_steps": total_steps, "selected_on_val": dict(best)})
            if cfg.method == "dho":
                for name in (evaluate.ALPHA_BETA_FILE, evaluate.HEATMAP_FILE):
                    os.replace(tmp / name, best_dir / name)
        return score

    def publish_best() -> None:
        """Copy checkpoints/best/* into RUN (each file atomically, model.pt last: its presence means done)."""
        from dho import evaluate

        names = [n for n in (evaluate.ALPHA_BETA_FILE, evaluate.HEATMAP_FILE) if (best_dir / n).is_file()] + ["model.pt"]
        for name in names:
            tmp = out / f".{name}.tmp"
            shutil.copyfile(best_dir / name, tmp)
            os.replace(tmp, out / name)

    def _loop(stop: StopSignal) -> tuple[int, list]:
        """Steps until the end of the schedule or --max-steps -> (last step, gradient diagnostics). SIGTERM/SIGINT
        end it early: a checkpoint at the current step, then Interrupted (the CLI exits with status 3)."""
        nonlocal t_last, seen_since
        step = start_step
        while step < stop_step:
            terms_sum: dict[str, float] = {}
            for micro_step in range(cfg.accum_steps):
                try:
                    batch = next_forward_batch()
                except RuntimeError as e:
                    if not workers_gone(e, stop):
                        raise
                    # SIGTERM took the DataLoader workers too: the model is as it was after `step` steps
                    if unchecked:
                        check_finite()  # never save weights after a non-finite loss
                    if is_main:
                        save_checkpoint(step)
                    raise Interrupted(f"stopped by {stop.name} at step {step}/{stop_step} with a checkpoint; continue with "
                                      f"`dho distill --resume {out}`") from None
                sync = micro_step == cfg.accum_steps - 1 or world == 1
                ctx = ddp.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    with autocast():
                        terms = step_fn(batch)
                    scaler.scale(terms["loss"] / cfg.accum_steps).backward()
                for k, v in terms.items():  # device tensors: no host sync inside the step
                    terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().float() / cfg.accum_steps
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr_used = optimizer.param_groups[0]["lr"]  # the rate of this step, before the schedule moves on
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if _TEST_STEP_SLEEP:
                time.sleep(_TEST_STEP_SLEEP)
            seen_since += 2 * cfg.batch_size if (uses_labeled and uses_unlabeled) else cfg.batch_size
            unchecked.append((step, terms_sum))
            end_of_epoch = step % steps_per_epoch == 0
            saving = step % cfg.checkpoint_every == 0 or end_of_epoch or step == stop_step
            logging = step % cfg.log_every == 0 or step == stop_step or step == start_step + 1
            sync_point = saving or logging or len(unchecked) >= 32  # the same steps on every rank
            stopping = stop.signum is not None
            if world > 1:  # every rank stops at the same step: agree at the sync points only
                stopping = sync_point and _any_rank(stopping, device)
            if sync_point or stopping:
                terms_sum = check_finite()  # the last step's terms, as floats
            if logging and world > 1:
                terms_sum = _mean_over_ranks(terms_sum, device, world)

            if cfg.log_grad_cosine and cfg.method in ("dho", "ce+kd") and step % cfg.log_grad_cosine == 0 and is_main:
                record = {"step": step, **_grad_diagnostics(model, batch, cfg, autocast)}
                grad_diag.append(record)
                log.write(record)
            if logging:
                now = time.time()
                rate = seen_since / max(now - t_last, 1e-9)
                eta_s = (stop_step - step) * (now - t0) / max(step - start_step, 1)
                record = {"step": step, "epoch": step / steps_per_epoch, "lr": lr_used,
                          "samples_per_s": rate, **{k: round(v, 6) for k, v in terms_sum.items()}}
                log.write(record)
                log.say(
                    f"step {step}/{stop_step} epoch {step / steps_per_epoch:.2f} loss {terms_sum['loss']:.4f} "
                    f"lr {record['lr']:.3g} | {rate:.1f} samples/s | ETA {_fmt_time(eta_s)}"
                )
                t_last, seen_since = now, 0
            if (saving or stopping) and is_main:
                save_checkpoint(step)
            if stopping:
                if world > 1:
                    torch.distributed.barrier()  # the checkpoint is on disk before any rank exits
                name = stop.name
                log.say(f"stopped by {name} at step {step}/{stop_step}; checkpoint {ckpt_path}")
                log.close()
                raise Interrupted(f"stopped by {name} at step {step}/{stop_step} with a checkpoint; continue with "
                                  f"`dho distill --resume {out}`")
            if end_of_epoch and cfg.eval_every_epoch and cfg.val and is_main:
                result = _validate(student, cfg, device)
                log.write({"step": step, "epoch": step // steps_per_epoch, **result})
                log.say(f"epoch {step // steps_per_epoch} validation: " + _format_val(result))
                if not cfg.select_best_on_val:
                    keep_best_val(step, result["val_combined_top1"])
                model.train()
            if end_of_epoch and cfg.select_best_on_val:
                if is_main:
                    score = keep_if_best(step)
                    log.write({"step": step, "epoch": step // steps_per_epoch, "val_selection_top1": score,
                               "best_val_top1": best["top1"], "best_epoch": best["epoch"]})
                    model.train()
                if world > 1:
                    torch.distributed.barrier()

        return step, grad_diag

    with StopSignal() as stop:
        step, grad_diag = _loop(stop)

    # ---- the end: the model, validation, plots ---------------------------------------------------
    if is_main:
        alpha, beta = METHOD_ALPHA_BETA[cfg.method] or (cfg.alpha, cfg.beta)
        if cfg.select_best_on_val and best["epoch"] is not None:
            publish_best()
            log.say(f"model.pt is epoch {best['epoch']} (step {best['step']}): the best on {cfg.val}, "
                    f"top-1 {best['top1']:.2f}" + (" with alpha/beta searched there" if cfg.method == "dho" else ""))
        else:
            save_student(out / "model.pt", student, classnames, alpha=alpha, beta=beta,
                         extra={"method": cfg.method, "steps": step, "total_steps": total_steps})
        if cfg.val:
            result = _validate(student, cfg, device)
            log.write({"step": step, "final": True, **result})
            log.say("validation: " + _format_val(result))
        if grad_diag:
            plot_grad_diagnostics({cfg.method: grad_diag}, out / "grad_cosine.png")
        log.say(f"done: {out / 'model.pt'}")
    log.close()
    if world > 1:
        torch.distributed.barrier()
    return out


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (one all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _mean_over_ranks(terms: dict[str, float], device: torch.device, world: int) -> dict[str, float]:
    """The logged loss terms averaged over ranks (each rank computed them on its share of the batch)."""
    keys = sorted(terms)
    t = torch.tensor([terms[k] for k in keys], device=device, dtype=torch.float32)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, (t / world).tolist()))


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _validate(student: nn.Module, cfg: DistillConfig, device: torch.device) -> dict:
    """Top-1/top-5 of ce_head, kd_head and the combination (Eq. 11) on --val."""
    from dho import evaluate

    student.eval()
    ce, kd, labels = evaluate.collect_logits(student, data.Dataset.open(cfg.val), batch_size=256, device=device, workers=cfg.workers)
    alpha, beta = METHOD_ALPHA_BETA[cfg.method] or (cfg.alpha, cfg.beta)
    return {
        "val_ce_head_top1": evaluate.topk_accuracy(ce, labels)[1],
        "val_kd_head_top1": evaluate.topk_accuracy(kd, labels)[1],
        "val_combined_top1": evaluate.topk_accuracy(evaluate.combine_heads(ce, kd, alpha, beta), labels)[1],
    }


def _format_val(result: dict) -> str:
    """One line of a validation result: top-1 of each head and of Eq. 11."""
    return (f"top-1 ce_head {result['val_ce_head_top1']:.2f}, kd_head {result['val_kd_head_top1']:.2f}, "
            f"combined {result['val_combined_top1']:.2f}")


GRAD_PANELS = (  # (key, y label, title): the panels of grad_cosine.png
    ("grad_cosine", "cos(∇θ L_CE, ∇θ L_KD)", "parameters of g (Fig. 4)"),
    ("pred_inner", "(p̂_CE − y)ᵀ(p̂_KD − p)", "prediction level (Eqs. 4–5, 8–9)"),
    ("grad_cosine_z", "cos(∇z L_CE, ∇z L_KD)", "features z (Eq. 5, Fig. 13 right)"),
    ("eig", "dominant eigenvalue", "W Wᵀ (Fig. 13 left)"),
)


def plot_grad_diagnostics(series: dict[str, list[dict]], path: Path) -> Path:
    """The gradient-conflict diagnostics over training, one line per run (e.g. {"dho": ..., "ce+kd": ...}):
    θ-cosine, prediction-level inner product, z-cosine and the dominant eigenvalues of W Wᵀ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for ax, (key, ylabel, title) in zip(axes, GRAD_PANELS):
        for name, records in series.items():
            if key == "eig":
                for k, style, label in (("eig_ce", "-", "W_CE W_CEᵀ"), ("eig_kd", "--", "W_KD W_KDᵀ"), ("eig_ce_kd", ":", "W_CE W_KDᵀ")):
                    pts = [(r["step"], r[k]) for r in records if k in r]
                    if pts:
                        ax.plot(*zip(*pts), style, marker=".", label=f"{name}: {label if name == 'dho' else 'W Wᵀ'}")
                ax.set_yscale("log")
                continue
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=name)
        if key != "eig":
            ax.axhline(0.0, color="gray", lw=0.8)
        if key.startswith("grad_cosine"):
            ax.set_ylim(-1, 1)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Gradient conflict between L_CE and L_KD during training", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

