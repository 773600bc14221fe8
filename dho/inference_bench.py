"""Inference cost of a finished run: parameters, FLOPs and images/s (paper Tables 2 and 7).

Three networks are measured in one call, on one device, at one precision:

    student       the run's student as it serves: backbone + ce_head + kd_head + Eq. 11's combination
                  with the run's alpha, beta (what `dho predict` and `dho export` run)
    single_head   the same backbone + ce_head only: the network of an SHO baseline, so the DHO
                  overhead reads as in Table 7 (+params, +FLOPs, throughput change)
    teacher       the teacher named in the run's labeled cache: its image tower, L2 normalisation
                  and the zero-shot classifier matmul (C x D). FLOPs and speed do not depend on the
                  weights, so the architecture is built with random weights (`pretrained="none"`)

Per network: parameters (the teacher's: its image tower; the (C, D) text classifier is a fixed
buffer, counted in FLOPs only), FLOPs per image and images/s at each batch size.

FLOPs are counted by torch's flop counter (`torch.utils.flop_counter.FlopCounterMode`) on one
forward of a single image, where a multiply-add is 2 FLOPs; `gmacs` = gflops / 2 is what the paper's
"FLOPs" column reports (multiply-accumulates: ResNet-18 at 224 px is 1.82 G there, 3.64 GFLOPs here).
The counter sees matrix products and convolutions only: normalisations, activations, softmax and
Eq. 11's combination cost nothing in it, so DHO's FLOP overhead is exactly kd_head's 2 x D x C (an mlp kd_head
of §E.2: 2 x (D x H + H x C); with an mlp ce_head the single-head network carries it too).
Two gaps of the counter are closed while counting: nn.MultiheadAttention's inference fast path
(one fused op it does not know, so ViT attention would count as zero) is switched off, and the CPU
flash-attention kernel gets torch's own attention formula.

images/s: `warmup` untimed forwards, then at least `iters` timed forwards and at least
`min_seconds`, each waited for (`torch.cuda.synchronize()` on CUDA), under `torch.inference_mode`;
batch 1 measures latency, a large batch throughput. The timed forwards are split into 3 rounds in
which the networks take turns, and each network reports its best round. fp16/bf16 run the fp32 weights under autocast,
as `dho precompute-teacher` runs its teacher (heads and the teacher's classifier stay fp32, as in
serving). Throughput differences of a few percent (DHO over SHO) are within run-to-run noise on a
shared machine; the parameter and FLOP overheads are exact.

ToMe (``tome_r``, paper Table 9): a fourth network, ``student_tome``, the served student with r tokens merged per
block (``dho.tome``, ViT students), measured beside the unmerged one in the same rounds; the counter sees the merged
model's shrinking token counts (and the matching's small cosine-similarity matmul), so its FLOPs are the merged
model's. ToMe's ratios over the unmerged student go under ``tome_over_student_pct``.

Accuracy (``data``, Table 9's first column): with a labeled dataset, the top-1/top-5 of both heads and of Eq. 11
(the run's alpha, beta) of the student, and of the merged student, as `dho evaluate` scores them (center view,
fp32, whatever the timing precision); the change in top-1 points under ``tome_over_student_pct``.

Out of scope: the Tip-Adapter-F cache model of DHO-F (a `tip-adapter-f(NAME)` cache is measured
as its base teacher NAME), data loading and decoding, torch.compile / TensorRT, memory use.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dho.data import Preprocessing
from dho.devices import resolve_device
from dho.errors import CacheError, ConfigError, check_choice, check_number
from dho.evaluate import (collect_logits, combine_heads, head_metrics, labeled_only, load_run, open_labeled, restrict,
                          run_alpha_beta)
from dho.losses import ZETA
from dho.run_dir import RunDir, write_json

DEFAULT_BATCH_SIZES = (1, 256)  # latency (one image) and serving throughput
DEFAULT_WARMUP = 5  # untimed forwards per network and batch size: cuDNN autotuning, allocator, caches
DEFAULT_ITERS = 20  # at least this many timed forwards ...
DEFAULT_MIN_SECONDS = 2.0  # ... and at least this long, so one number is never one noisy forward
PRECISIONS = ("fp32", "bf16", "fp16")
TEACHER_MODEL_HINT = "pass teacher_model= (CLI: --teacher-model NAME_OR_CONFIG_JSON) or teacher=False (CLI: --no-teacher)"
_FLOP_BATCH = 1  # FLOPs are counted on one forward of this many images, then divided
_ROUNDS = 3  # timing rounds per batch size; each network reports its best round


# --------------------------------------------------------------------------------------------
# the measured networks
# --------------------------------------------------------------------------------------------


class ServedStudent(nn.Module):
    """backbone + both heads + Eq. 11: images (B, 3, S, S) -> probabilities (B, C)."""

    def __init__(self, student: nn.Module, alpha: float, beta: float):
        super().__init__()
        self.student, self.alpha, self.beta = student, float(alpha), float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.student(x)
        return combine_heads(out["ce_logits"], out["kd_logits"], self.alpha, self.beta)  # (B, C)


class SingleHeadStudent(nn.Module):
    """The SHO baseline's network: the same backbone with one linear head (ce_head) -> logits (B, C)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.backbone, self.head = student.backbone, student.ce_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # (B, C)


class ZeroShotTeacher(nn.Module):
    """Image tower f_X, L2 normalisation and the zero-shot classifier (Eq. 1) -> logits (B, C)."""

    def __init__(self, visual: nn.Module, classifier: torch.Tensor, zeta: float = ZETA):
        super().__init__()
        self.visual, self.zeta = visual, float(zeta)
        self.register_buffer("classifier", classifier)  # (C, D) unit rows, fixed: not a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.visual(x)  # (B, D)
        # float32 outside autocast, as Teacher.encode_images / Teacher.logits
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.normalize(z.float(), dim=-1) @ self.classifier.T / self.zeta  # (B, C)


# --------------------------------------------------------------------------------------------
# counting and timing
# --------------------------------------------------------------------------------------------


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # the formula torch uses for the CUDA kernels


@contextmanager
def _mha_fastpath(enabled: bool):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward of `x` (B, 3, S, S) as torch's flop counter counts them (multiply-add = 2)."""
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop}
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    with _mha_fastpath(False), torch.inference_mode(), counter:
        module(x)
    return int(counter.get_total_flops())


def images_per_second(module: nn.Module, x: torch.Tensor, *, warmup: int, iters: int, min_seconds: float) -> float:
    """Images/s of `module` on the batch `x`: `warmup` untimed forwards, then >= `iters` and >= `min_seconds`."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            module(x)
        sync()
        n, start = 0, time.perf_counter()
        while n < iters or time.perf_counter() - start < min_seconds:
            module(x)
            sync()
            n += 1
        elapsed = time.perf_counter() - start
    return n * x.shape[0] / elapsed


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


# --------------------------------------------------------------------------------------------
# the teacher of a run
# --------------------------------------------------------------------------------------------


def architecture_name(model: str) -> str:
    """The open_clip architecture behind a cache's teacher name: `tip-adapter-f(NAME)` -> NAME."""
    match = re.fullmatch(r"tip-adapter-f\((.+)\)", model)
    return match.group(1) if match else model


def _run_teacher(run_dir: Path) -> dict:
    """{model, pretrained, model_config_sha256, image_size, num_classes, cache} from RUN/config.json's labeled cache."""
    from dho.cache import TeacherCache

    config_file = RunDir(run_dir).config
    if not config_file.is_file():
        raise ConfigError(f"{config_file} not found, so the run's teacher is unknown; {TEACHER_MODEL_HINT}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file} is not valid JSON ({e}); {TEACHER_MODEL_HINT}") from e
    if not isinstance(config, dict) or not config.get("labeled_cache"):
        raise ConfigError(f"{config_file} names no labeled_cache, so the run's teacher is unknown; {TEACHER_MODEL_HINT}")
    try:
        cache = TeacherCache.open(config["labeled_cache"])
    except CacheError as e:
        raise ConfigError(f"{config_file}: its labeled_cache cannot be opened ({e}); {TEACHER_MODEL_HINT}") from e
    t = cache.attrs["teacher"]
    return {"model": str(t["model"]), "pretrained": str(t["pretrained"]), "model_config_sha256": t.get("model_config_sha256"),
            "image_size": Preprocessing.from_dict(cache.attrs["preprocess"]).image_size, "num_classes": int(cache.num_classes),
            "cache": str(cache.path)}


def build_teacher(run_dir: Path, teacher_model: Optional[str], num_classes: int,
                  device: torch.device) -> tuple[ZeroShotTeacher, dict]:
    """The run's teacher architecture with random weights and a random (C, D) unit-row classifier -> (module, info)."""
    from dho.teacher import load_teacher

    try:
        named = _run_teacher(run_dir)
    except ConfigError:
        if teacher_model is None:
            raise
        named = {"model": None, "pretrained": None, "model_config_sha256": None, "image_size": None,
                 "num_classes": num_classes, "cache": None}  # the override alone: its own input size, the student's classes
    if teacher_model is not None:
        model = str(teacher_model)
        what = f"teacher_model= (--teacher-model) {model!r}"
        fix = "pass an open_clip model name or model-config JSON"
    else:
        model = architecture_name(named["model"])
        what, fix = f"teacher {model!r} of the cache {named['cache']}", TEACHER_MODEL_HINT
    if model.startswith("local-dir:"):
        raise ConfigError(f"{what} is an open_clip folder, which cannot be rebuilt from its name; {fix} "
                          "of its architecture")
    try:
        teacher = load_teacher(model=model, pretrained="none", device=device, precision="fp32",
                               image_size=named["image_size"], verbose=False)
    except ConfigError as e:
        raise ConfigError(f"{what} cannot be built ({e}); {fix}") from e
    gen = torch.Generator().manual_seed(0)
    classifier = F.normalize(torch.randn(named["num_classes"], teacher.embed_dim, generator=gen), dim=-1)  # (C, D)
    module = ZeroShotTeacher(teacher.model.visual, classifier.to(device)).eval()
    stored = named["model_config_sha256"]
    info = {"model": model, "cache_teacher": named["model"], "cache_pretrained": named["pretrained"], "cache": named["cache"],
            "image_size": teacher.preprocess.image_size, "num_classes": int(named["num_classes"]),
            "architecture_matches_cache": None if stored is None else stored == teacher.identity["model_config_sha256"]}
    return module, info


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------


def _check_options(batch_sizes, precision: str, device: torch.device, warmup, iters, min_seconds, tome_r,
                   workers) -> tuple[int, ...]:
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence) or len(batch_sizes) == 0:
        raise ConfigError(f"--batch-sizes must be one or more positive integers, e.g. 1,256; got {batch_sizes!r}")
    for b in batch_sizes:
        check_number("--batch-sizes", b, low=1, integer=True)
    check_choice("--precision", precision, PRECISIONS)
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("--precision fp16 needs a CUDA device; on the CPU use fp32 or bf16")
    check_number("--warmup", warmup, low=0, integer=True)
    check_number("--iters", iters, low=1, integer=True)
    check_number("--min-seconds", min_seconds, low=0)
    if tome_r is not None:
        check_number("--tome-r", tome_r, low=0, integer=True)
    check_number("--workers", workers, low=0, integer=True)
    return tuple(sorted(set(batch_sizes)))


def _pct(new: float, old: float) -> float:
    return 100.0 * (new - old) / old


def bench_inference(
    run_dir: Union[str, Path],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    device: Union[str, torch.device] = "auto",
    precision: str = "fp32",
    teacher: bool = True,
    teacher_model: Optional[str] = None,
    warmup: int = DEFAULT_WARMUP,
    iters: int = DEFAULT_ITERS,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    tome_r: Optional[int] = None,
    data: Union[str, Path, None] = None,
    workers: int = 2,
) -> dict:
    """Parameters, FLOPs per image and images/s of the run's student, its single-head (SHO) variant and
    (with `teacher`) its teacher, with the teacher/student ratios and DHO-over-SHO overheads -> a JSON-able dict.

    `teacher_model` replaces the cache's teacher name (an open_clip model name or model-config JSON),
    for teachers that cannot be rebuilt from it (`local-dir:`, a config file since moved).
    `tome_r`: also the student with ToMe, r tokens merged per block (Table 9). `data`: a labeled dataset on which
    the student (and the merged student) are also scored, read by `workers` DataLoader workers.
    """
    run_dir = Path(run_dir)
    device = resolve_device(device)
    batch_sizes = _check_options(batch_sizes, precision, device, warmup, iters, min_seconds, tome_r, workers)
    student, meta = load_run(run_dir, device)
    alpha, beta, alpha_beta_source = run_alpha_beta(run_dir, meta)
    size = student.preprocess.image_size
    name = meta["build_args"]["name"]
    nets = {  # role -> (name, module, input size)
        "student": (f"DHO student {name} (2 heads + Eq. 11)", ServedStudent(student, alpha, beta).eval(), size),
    }
    scored = {"student": student}  # role -> the DualHeadStudent scored on `data`
    tome_info = None
    if tome_r is not None:
        from dho.tome import apply_tome

        merged = copy.deepcopy(student)
        tome_info = apply_tome(merged, tome_r)
        nets["student_tome"] = (f"DHO student {name} + ToMe r={tome_info['r']}", ServedStudent(merged, alpha, beta).eval(), size)
        scored["student_tome"] = merged
    nets["single_head"] = (f"SHO baseline {name} (1 head)", SingleHeadStudent(student).eval(), size)
    labeled = open_labeled(data, meta["classnames"], "--data") if data is not None else None
    teacher_info = None
    if teacher:
        module, teacher_info = build_teacher(run_dir, teacher_model, student.num_classes, device)
        nets["teacher"] = (f"teacher {teacher_info['model']} (zero-shot)", module, teacher_info["image_size"])

    models = {}
    for role, (label, module, s) in nets.items():
        with _autocast(device, precision):
            flops = count_flops(module, torch.zeros(_FLOP_BATCH, 3, s, s, device=device)) // _FLOP_BATCH
        params = sum(p.numel() for p in module.parameters())
        models[role] = {"name": label, "input_size": s, "params": params, "params_m": params / 1e6, "flops": flops,
                        "gflops": flops / 1e9, "gmacs": flops / 2e9, "images_per_s": {}}
    data_info = None
    if labeled is not None:
        ds, columns = labeled
        for role, module in scored.items():
            ce, kd, labels = labeled_only(*collect_logits(module, ds, batch_size=256, device=device, workers=workers))
            ce, kd = restrict(ce, kd, columns)
            models[role]["accuracy"] = head_metrics(ce, kd, labels, alpha, beta)
        data_info = {"data": str(ds.root), "data_fingerprint": ds.fingerprint, "num_samples": int(len(labels))}
    gen = torch.Generator().manual_seed(0)
    for b in batch_sizes:
        xs = {role: torch.randn(b, 3, s, s, generator=gen).to(device) for role, (_, _, s) in nets.items()}  # (B, 3, S, S)
        for r in range(_ROUNDS):  # the networks alternate, so a burst of other load hits a round, not a network
            for role, (label, module, _) in nets.items():
                try:
                    with _autocast(device, precision):
                        ips = images_per_second(module, xs[role], warmup=warmup if r == 0 else 0,
                                                iters=math.ceil(iters / _ROUNDS), min_seconds=min_seconds / _ROUNDS)
                except torch.OutOfMemoryError as e:
                    raise ConfigError(f"{label} at batch size {b} does not fit in the memory of {_device_name(device)}; "
                                      "pass smaller --batch-sizes") from e
                best = models[role]["images_per_s"].get(str(b), 0.0)
                models[role]["images_per_s"][str(b)] = max(best, ips)
        del xs

    dho, sho = models["student"], models["single_head"]
    ratios = {"dho_over_sho_pct": {"params": _pct(dho["params"], sho["params"]), "gflops": _pct(dho["flops"], sho["flops"]),
                                   "images_per_s": {k: _pct(v, sho["images_per_s"][k]) for k, v in dho["images_per_s"].items()}}}
    if tome_r is not None:
        tm = models["student_tome"]
        ratios["tome_over_student_pct"] = {"params": _pct(tm["params"], dho["params"]), "gflops": _pct(tm["flops"], dho["flops"]),
                                           "images_per_s": {k: _pct(v, dho["images_per_s"][k]) for k, v in tm["images_per_s"].items()}}
        if data_info is not None:  # points of top-1, as Table 9's "(-0.2)"
            ratios["tome_over_student_pct"]["top1_points"] = tm["accuracy"]["combined"]["top1"] - dho["accuracy"]["combined"]["top1"]
    if teacher:
        t = models["teacher"]
        ratios["teacher_over_student"] = {"params": t["params"] / dho["params"], "gflops": t["flops"] / dho["flops"],
                                          "speedup": {k: v / t["images_per_s"][k] for k, v in dho["images_per_s"].items()}}
    return {
        "run_dir": str(run_dir),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "precision": precision,
        "batch_sizes": list(batch_sizes),
        "timing": {"warmup": warmup, "iters": iters, "min_seconds": min_seconds},
        "alpha": alpha,
        "beta": beta,
        "alpha_beta_source": alpha_beta_source,
        "num_classes": int(student.num_classes),
        "teacher": teacher_info,
        "tome": tome_info,
        "accuracy_data": data_info,
        "models": models,
        "ratios": ratios,
    }


def write_inference_cost(run_dir: Union[str, Path], result: dict) -> Path:
    """Write `result` to RUN_DIR/inference_cost.json atomically (a crash never leaves half a file)."""
    return write_json(RunDir(run_dir).inference_cost, result)


def _signed(p: float) -> str:
    return f"{p:+.1f}%" if abs(p) >= 0.1 or p == 0 else f"{p:+.3f}%"


def format_table(result: dict) -> str:
    """A plain-text table in the manner of the paper's Table 7, with the ratio lines."""
    sizes = [str(b) for b in result["batch_sizes"]]
    w = max(len(m["name"]) for m in result["models"].values())
    scored = result.get("accuracy_data") is not None
    header = (f"{'model':<{w}} {'input':>5} {'params (M)':>10} {'GFLOPs':>9} {'GMACs':>9}" + (f" {'top-1':>6}" if scored else "")
              + "".join(f" {'img/s @' + b:>11}" for b in sizes))
    lines = [f"inference cost of {result['run_dir']}: {result['device']} ({result['device_name']}), {result['precision']}, "
             f"torch {result['torch']}", header, "-" * len(header)]
    for m in result["models"].values():
        top1 = (f" {m['accuracy']['combined']['top1']:>6.2f}" if "accuracy" in m else f" {'-':>6}") if scored else ""
        lines.append(f"{m['name']:<{w}} {m['input_size']:>5} {m['params_m']:>10.3f} {m['gflops']:>9.4g} {m['gmacs']:>9.4g}{top1}"
                     + "".join(f" {m['images_per_s'][b]:>11.1f}" for b in sizes))
    o = result["ratios"]["dho_over_sho_pct"]
    lines.append("")
    lines.append(f"DHO over SHO: params {_signed(o['params'])}, FLOPs {_signed(o['gflops'])}, images/s "
                 + ", ".join(f"{_signed(o['images_per_s'][b])} @{b}" for b in sizes))
    if "tome_over_student_pct" in result["ratios"]:
        t, tome = result["ratios"]["tome_over_student_pct"], result["tome"]
        points = f", top-1 {t['top1_points']:+.2f} points" if "top1_points" in t else ""
        lines.append(f"ToMe r={tome['r']} over DHO: FLOPs {_signed(t['gflops'])}, images/s "
                     + ", ".join(f"{_signed(t['images_per_s'][b])} @{b}" for b in sizes)
                     + f"{points} (tokens per block {tome['tokens_per_block'][0]} -> {tome['tokens_out']})")
    if scored:
        d = result["accuracy_data"]
        lines.append(f"top-1 = Eq. 11 with alpha={result['alpha']:g}, beta={result['beta']:g} on {d['data']} "
                     f"({d['num_samples']} samples, fp32, center view)")
    if "teacher_over_student" in result["ratios"]:
        r = result["ratios"]["teacher_over_student"]
        lines.append(f"teacher / student: params {r['params']:.3g}x, FLOPs {r['gflops']:.3g}x, speed-up "
                     + ", ".join(f"{r['speedup'][b]:.3g}x @{b}" for b in sizes))
        if result["teacher"].get("architecture_matches_cache") is False:
            lines.append(f"note: teacher {result['teacher']['model']} is not the architecture the cache records "
                         f"({result['teacher']['cache_teacher']})")
    lines.append("GMACs = multiply-accumulates, the paper's \"FLOPs\" (ResNet-18 at 224 px: 1.82 G); GFLOPs = 2 x GMACs.")
    return "\n".join(lines)
